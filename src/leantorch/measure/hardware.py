"""What a timing ran on: the CPU's model, vendor, core counts and matrix features, torch's view
of the CPU, the thread count and the torch version.

A speedup measured on one CPU says little about another: an int8 matmul is several times
faster with AVX-512 VNNI or AMX than without, and a bf16 one needs AVX512-BF16 or AMX. So every
report that prints a latency or a speedup carries this block (``report.json`` of ``leantorch
compress``, ``leantorch profile --json``, every ``benchmarks/results/*.json``).

On Linux the CPU is read from ``/proc/cpuinfo``; elsewhere the model name comes from
:mod:`platform` and the features are ``None`` (unknown, not absent).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from typing import Any

import torch

__all__ = [
    "ARM_FEATURES",
    "X86_FEATURES",
    "cpu_info",
    "machine_info",
    "machine_summary",
    "parse_cpuinfo",
]

# x86 flags that decide matmul speed: 8-bit dot products (VNNI), bf16 dot products, and the AMX
# tile units (Sapphire Rapids and later) that torch's oneDNN kernels use for int8 and bf16.
X86_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                "amx_int8", "amx_tile")
# Arm's counterparts: dot products, int8 / bf16 matrix multiply, scalable vectors and SME.
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")

# how a person says the features that matter, for one-line summaries
_NAMES = {"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX512-BF16",
          "amx_tile": "AMX", "i8mm": "I8MM", "bf16": "BF16", "sve": "SVE", "sme": "SME"}


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The CPU described by the text of a Linux ``/proc/cpuinfo``.

    Returns ``{"model", "vendor", "logical_cpus", "physical_cores", "features"}``: the first
    ``model name`` (or Arm's ``Hardware`` / ``Processor`` line), ``vendor_id`` (or Arm's ``CPU
    implementer``), the number of ``processor`` entries, the number of distinct
    ``(physical id, core id)`` pairs (``None`` when the file does not list them, as in many
    VMs and on Arm), and ``{feature: bool}`` for :data:`X86_FEATURES` when the file has x86
    ``flags`` lines, for :data:`ARM_FEATURES` when it has Arm ``Features`` lines, else ``None``.
    """
    model = vendor = None
    flags: set[str] | None = None
    arm = False
    logical = 0
    cores: set[tuple[str, str]] = set()
    physical_id = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor" and value.isdigit():
            logical += 1
            physical_id = None
        elif (key in ("model name", "processor") and model is None) or \
                (key == "hardware" and value):
            # x86 "model name"; old Arm kernels' "Processor : AArch64 ..."; an Arm SoC's
            # "Hardware" line names it better than either
            model = value
        elif key in ("vendor_id", "cpu implementer") and vendor is None:
            vendor = value
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
            arm = key == "features"
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id or "0", value))
    features = None
    if flags is not None:
        names = ARM_FEATURES if arm else X86_FEATURES
        features = {name: name in flags for name in names}
    return {"model": model, "vendor": vendor, "logical_cpus": logical or None,
            "physical_cores": len(cores) or None, "features": features}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """This machine's CPU (see :func:`parse_cpuinfo`), plus ``available_cpus`` (those this
    process may run on) and ``source`` (where it was read). Cached: the CPU does not change."""
    info: dict[str, Any] | None = None
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                info = parse_cpuinfo(handle.read())
            info["source"] = "/proc/cpuinfo"
        except OSError:
            info = None
    if info is None:
        info = {"model": None, "vendor": None, "logical_cpus": None, "physical_cores": None,
                "features": None, "source": "platform"}
    info["model"] = info["model"] or platform.processor() or platform.machine() or "unknown"
    info["logical_cpus"] = info["logical_cpus"] or os.cpu_count()
    try:
        info["available_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on macOS / Windows
        info["available_cpus"] = info["logical_cpus"]
    return info


def _torch_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old or unusual build: report "unknown" rather than fail a report
        return None


def machine_info() -> dict[str, Any]:
    """The ``machine`` block of every report that carries a time.

    ``threads`` and ``interop_threads`` are torch's at the time of the call: call it where the
    timing happens. ``torch_cpu_capability`` is the instruction set torch's own CPU kernels
    dispatch to (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``...; oneDNN picks VNNI / AMX by itself).
    ``cpu`` holds ``model, vendor, logical_cpus, physical_cores, available_cpus, features,
    source`` (see :func:`cpu_info`).
    """
    static = _static_info()
    return {
        "cpu": dict(static["cpu"]),
        "torch_cpu_capability": static["torch_cpu_capability"],
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": static["torch"],
        "python": static["python"],
        "platform": static["platform"],
    }


@functools.lru_cache(maxsize=1)
def _static_info() -> dict[str, Any]:
    # platform.platform() reads the interpreter binary to find the libc version: once is enough
    return {"cpu": cpu_info(), "torch_cpu_capability": _torch_capability(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def machine_summary(info: dict[str, Any] | None = None) -> str:
    """One line for a table's footnote, e.g. ``"Intel(R) Xeon(R) Processor (AVX-512 VNNI,
    AVX512-BF16, AMX), torch CPU capability AVX512, 2 threads"``."""
    info = machine_info() if info is None else info
    cpu = info["cpu"]
    features = cpu.get("features")
    if features is None:
        said = "features unknown"
    else:
        said = ", ".join(_NAMES[name] for name in _NAMES if features.get(name)) or \
            ("AVX2" if features.get("avx2") else "no matrix extensions")
    capability = info.get("torch_cpu_capability")
    return (f"{cpu['model']} ({said})"
            + (f", torch CPU capability {capability}" if capability else "")
            + f", {info['threads']} thread{'s' if info['threads'] != 1 else ''}")
