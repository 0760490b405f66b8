"""What a timing ran on: the CPU's model, vendor, core counts and matrix features, torch's view
of the CPU, the thread count and the torch version.

A speedup measured on one CPU says little about another: an int8 matmul is several times
faster with AVX-512 VNNI or AMX than without, and a bf16 one needs AVX512-BF16 or AMX. So every
report that prints a latency or a speedup carries this block (``report.json`` of ``leantorch
compress``, ``leantorch profile --json``, every ``benchmarks/results/*.json``).

On Linux the CPU is read from ``/proc/cpuinfo``; elsewhere the model name comes from
:mod:`platform` and the features are ``None`` (unknown, not absent).

Which kernel a matmul takes is a second question: :func:`kernel_paths` runs one tiny matmul
per dtype once per process with oneDNN's verbose mode on and reads what oneDNN reports (its
ISA line, e.g. "Intel AVX10.1 and Intel AMX with bfloat16 and 8-bit integer support", and the
implementation of each primitive, e.g. ``brg_matmul:avx10_1_512_amx``). Found in torch 2.13 on
a CPU: float32 ``torch.mm`` goes to the BLAS torch was built with (MKL: no oneDNN primitive
runs), bfloat16 and float16 matmuls to oneDNN's ``brg_matmul`` (AMX for bf16 where the CPU has
it; fp16 uses AVX-512 FP16 or AMX-FP16), ``torch._int_mm`` to oneDNN's s8 x s8 -> s32 GEMM API
(which does not name its ISA; it runs VNNI kernels, not AMX, so its unit is read from the
VNNI flags). The paths go in
every :func:`machine_info` block; :func:`matrix_peaks` measures the rates only when asked.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from leantorch.errors import LeanError, LeanTypeError, describe

__all__ = [
    "ARM_FEATURES",
    "X86_FEATURES",
    "cpu_info",
    "describe_kernel_paths",
    "kernel_paths",
    "machine_info",
    "machine_summary",
    "matrix_peaks",
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
    source`` (see :func:`cpu_info`); ``kernel_paths`` which kernels fp32 / bf16 / fp16 / int8
    matmuls take here (see :func:`kernel_paths`; probed once per process).
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
        "kernel_paths": kernel_paths(),
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


# --------------------------------------------------------------------------- kernel paths
PROBED_DTYPES = ("float32", "bfloat16", "float16", "int8")
_ONEDNN_EXEC = re.compile(r"onednn_verbose,(?:v1,)?(?:primitive,)?exec,cpu,([^,]*),([^,]*),")
_ONEDNN_ISA = re.compile(r"onednn_verbose,(?:v1,)?info,cpu,isa:(.*)")
_ONEDNN_VERSION = re.compile(r"oneDNN v([0-9][0-9.]*)")


@contextlib.contextmanager
def _stdout_captured() -> Iterator[Callable[[], str]]:
    """Capture what C code writes to file descriptor 1 (oneDNN prints its verbose lines with
    printf, below Python's sys.stdout); yields a function returning the text."""
    sys.stdout.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(1)
        text: list[str] = []
        try:
            os.dup2(sink.fileno(), 1)
            yield lambda: "".join(text)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", errors="replace"))


def _probe_matmuls() -> dict[str, Callable[[], object]]:
    a = torch.ones(32, 32)
    i8 = torch.ones(32, 32, dtype=torch.int8)
    return {"float32": lambda: torch.mm(a, a),
            "bfloat16": lambda: torch.mm(a.bfloat16(), a.bfloat16()),
            "float16": lambda: torch.mm(a.half(), a.half()),
            "int8": lambda: torch._int_mm(i8, i8)}


def _onednn_verbose() -> dict[str, str] | None:
    """{dtype: oneDNN verbose text printed while one small matmul of that dtype ran}, plus
    ``"header"`` (what printed first, where oneDNN puts its version and ISA lines), or None
    when verbose mode is not available in this build."""
    if not torch.backends.mkldnn.is_available():
        return None
    texts: dict[str, str] = {}
    try:
        for dtype, matmul in _probe_matmuls().items():
            with _stdout_captured() as read, \
                    torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                try:
                    matmul()
                except RuntimeError as error:  # an op this build lacks
                    texts[f"{dtype}_error"] = str(error).splitlines()[0]
            texts[dtype] = read()
    except (OSError, RuntimeError, AttributeError):  # no fd 1, or no verbose switch
        return None
    return texts


def describe_kernel_paths(features: dict[str, bool] | None, capability: str | None,
                          mkldnn: bool, verbose: dict[str, str] | None,
                          blas: str | None = None) -> dict[str, Any]:
    """The kernel paths, from what was read: the CPU ``features`` (:func:`parse_cpuinfo`),
    torch's CPU ``capability``, whether oneDNN is built in, the oneDNN ``verbose`` texts per
    dtype (:func:`kernel_paths` captures them; None when not captured) and the ``blas`` torch
    was built with. Pure, so canned texts test it.

    Returns ``{"onednn": {"available", "version", "isa"}, "blas", "float32": path,
    "bfloat16": path, "float16": path, "int8": path}``, each path ``{"library",
    "implementation", "unit", "source"}``: ``library`` "oneDNN" or the BLAS (a float matmul no
    oneDNN primitive reported), ``implementation`` what oneDNN named (None when it did not run
    or does not say), ``unit`` the matrix hardware: "AMX", "AVX512-BF16", "AVX512-FP16",
    "AVX-512 VNNI", "AVX-VNNI", "AVX-512", "AVX2" or "none", ``source`` "onednn verbose" when
    the unit was read from the implementation name, "cpu flags" when inferred from them."""
    f = features or {}
    texts = verbose or {}
    joined = "\n".join(texts.values())
    isa = _ONEDNN_ISA.search(joined)
    version = _ONEDNN_VERSION.search(joined)
    vector = "AVX-512" if (capability or "").upper().startswith("AVX512") or \
        f.get("avx512f") else ("AVX2" if (capability or "").upper() == "AVX2" or
                               f.get("avx2") else "none")

    def from_name(name: str) -> str | None:
        name = name.lower()
        if "amx" in name:
            return "AMX"
        if "avx10" in name or "avx512" in name:
            return "AVX-512"
        if "avx2" in name:
            return "AVX2"
        return None

    paths: dict[str, Any] = {}
    for dtype in PROBED_DTYPES:
        ran = [(m.group(1), m.group(2)) for m in _ONEDNN_EXEC.finditer(texts.get(dtype, ""))]
        entry: dict[str, Any]
        if verbose is not None and not ran and dtype in ("float32", "float16", "bfloat16"):
            entry = {"library": blas or "BLAS", "implementation": None, "unit": vector,
                     "source": "onednn verbose (no oneDNN primitive ran)"}
        elif ran:
            kind, impl = ran[-1]
            unit = from_name(impl)
            entry = {"library": "oneDNN", "implementation": f"{kind}:{impl}" if impl else kind,
                     "unit": unit, "source": "onednn verbose"}
        else:
            entry = {"library": "oneDNN" if mkldnn and dtype != "float32" else
                     (blas or "BLAS"), "implementation": None, "unit": None,
                     "source": "cpu flags"}
        if entry["unit"] is None or (entry["unit"] == "AVX-512" and dtype != "float32"):
            entry["unit"], inferred = _unit_from_flags(dtype, f, vector, entry["unit"])
            if inferred:
                entry["source"] = "cpu flags" if entry["implementation"] is None else \
                    "onednn verbose + cpu flags"
        if f"{dtype}_error" in texts:
            entry["error"] = texts[f"{dtype}_error"]
        paths[dtype] = entry
    return {"onednn": {"available": mkldnn, "version": version.group(1) if version else None,
                       "isa": isa.group(1).strip() if isa else None},
            "blas": blas, **paths}


def _unit_from_flags(dtype: str, f: dict[str, bool], vector: str, seen: str | None
                     ) -> tuple[str, bool]:
    """The matrix unit a low-precision kernel can use on a CPU with flags ``f`` (oneDNN picks
    the best one it has): (unit, whether it was inferred)."""
    if dtype == "int8":
        # oneDNN's s8 GEMM API (torch._int_mm) names no ISA; its kernels are VNNI ones, not
        # AMX: on a Sapphire Rapids core a 256^3 torch._int_mm runs several times slower than
        # the bf16 brg_matmul that reports AMX
        for flag, unit in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")):
            if f.get(flag):
                return unit, True
    if dtype == "bfloat16" and f.get("avx512_bf16"):
        return "AVX512-BF16", True
    if dtype == "float16" and f.get("avx512_fp16"):
        return "AVX512-FP16", True
    return seen or vector, seen is None


def _blas() -> str | None:
    config = torch.__config__.show()
    found = re.search(r"BLAS_INFO=([A-Za-z0-9_]+)", config)
    return None if found is None else found.group(1).upper() if found.group(1) == "mkl" \
        else found.group(1)


@functools.lru_cache(maxsize=1)
def kernel_paths() -> dict[str, Any]:
    """Which kernels fp32 / bf16 / fp16 / int8 matmuls take on this machine (see
    :func:`describe_kernel_paths` for the fields). Probed once per process: four 32x32
    matmuls with oneDNN's verbose mode on, their output captured from file descriptor 1."""
    features = dict(cpu_info().get("features") or {})
    # avx512_fp16 is not in X86_FEATURES (the summary line), but decides the fp16 unit
    if cpu_info().get("source") == "/proc/cpuinfo":
        with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8",
                                                errors="replace") as handle:
            flags = next((line.partition(":")[2].split() for line in handle
                          if line.startswith("flags")), [])
            features["avx512_fp16"] = "avx512_fp16" in flags
    return describe_kernel_paths(features or None, _torch_capability(),
                                 torch.backends.mkldnn.is_available(), _onednn_verbose(),
                                 _blas())


# --------------------------------------------------------------------------- peaks
_CALL_SECONDS = 0.02
_PEAK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "int8": torch.int8}


def matrix_peaks(dtypes: Sequence[str] = ("float32", "bfloat16", "int8"), size: int = 1024,
                 seconds: float = 1.0) -> dict[str, Any]:
    """Measure square ``size`` x ``size`` matmul throughput per dtype on this CPU, the dtypes
    timed in alternating rounds in one process (:func:`leantorch.measure.compare_interleaved`)
    for about ``seconds`` in all (3 to 25 rounds; each timed call repeats its matmul for about
    20 ms, ``repeats_per_call`` times; ``median_ms`` is per matmul). float dtypes run ``torch.mm``, ``"int8"`` runs
    ``torch._int_mm`` (int8 x int8 -> int32).

    Returns ``{"size", "threads", "rounds", "peaks": {dtype: {"op", "median_ms",
    "ops_per_second", "speedup_vs_float32"}}, "kernel_paths", "machine"}``:
    ``ops_per_second`` counts the ``2 size**3`` FLOPs of a matmul (integer OPs for int8);
    ``speedup_vs_float32`` is the median of the per-round ratios float32 time / this time
    (None when float32 was not measured)."""
    from leantorch.measure.latency import compare_interleaved
    from leantorch.validate import positive_int

    if isinstance(dtypes, str) or not isinstance(dtypes, Sequence) or not dtypes:
        raise LeanTypeError(f"matrix_peaks: dtypes={describe(dtypes)}; expected a non-empty "
                            f"list of {', '.join(map(repr, _PEAK_DTYPES))}")
    for name in dtypes:
        if name not in _PEAK_DTYPES:
            raise LeanError(f"matrix_peaks: dtype {describe(name)} in dtypes; expected "
                            f"{', '.join(map(repr, _PEAK_DTYPES))}")
    if len(set(dtypes)) != len(dtypes):
        raise LeanError(f"matrix_peaks: dtypes={describe(dtypes)} names a dtype twice")
    size = positive_int("matrix_peaks", "size", size, minimum=16)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or \
            not 0 < seconds <= 600:
        raise LeanError(f"matrix_peaks: seconds={describe(seconds)}; expected a number in "
                        "(0, 600]")
    g = torch.Generator().manual_seed(0)
    fns: dict[str, Callable[[], object]] = {}
    for name in dtypes:
        if name == "int8":
            a = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=g)
            b = torch.randint(-127, 128, (size, size), dtype=torch.int8, generator=g)
            fns[name] = lambda a=a, b=b: torch._int_mm(a, b)
        else:
            a = torch.randn(size, size, generator=g).to(_PEAK_DTYPES[name])
            b = torch.randn(size, size, generator=g).to(_PEAK_DTYPES[name])
            fns[name] = lambda a=a, b=b: torch.mm(a, b)
    # Untimed calls size the work: each timed call repeats its matmul until it lasts about
    # _CALL_SECONDS (a small matmul alone is below the clock's and the round's overheads), and
    # the rounds fill the time asked for, between 3 and 25 (each round also collects garbage).
    repeats: dict[str, int] = {}
    for name, fn in fns.items():
        fn()  # first call: kernel selection, JIT, packing
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        repeats[name] = max(1, math.ceil(_CALL_SECONDS / once))
    timed = {name: (lambda fn=fn, n=repeats[name]: [fn() for _ in range(n)])
             for name, fn in fns.items()}
    per_round = _CALL_SECONDS * len(fns)
    rounds = max(3, min(25, int(seconds / per_round)))
    baseline = "float32" if "float32" in fns else next(iter(fns))
    comparison = compare_interleaved(timed, baseline=baseline, rounds=rounds, warmup=1)
    ops = 2 * size ** 3
    peaks = {}
    for name in dtypes:
        entry = comparison[name]
        per_matmul_ms = entry.median_ms / repeats[name]
        peaks[name] = {
            "op": "torch._int_mm" if name == "int8" else "torch.mm",
            "median_ms": per_matmul_ms,
            "repeats_per_call": repeats[name],
            "ops_per_second": ops / (per_matmul_ms / 1e3),
            # the median of per-round float32 / this-dtype time ratios (per matmul): above 1
            # is faster
            "speedup_vs_float32": (entry.speedup.median * repeats[name] / repeats[baseline]
                                   if "float32" in fns else None),
        }
    return {"size": size, "threads": torch.get_num_threads(), "rounds": rounds,
            "peaks": peaks, "kernel_paths": {d: kernel_paths()[d] for d in dtypes},
            "machine": machine_summary()}
