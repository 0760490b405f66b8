"""Device specs for the roofline view: peak FLOP/s and memory bandwidth.

A spec is either measured on this machine (:func:`calibrate`: a short matmul for the compute
peak and a large copy for the bandwidth) or read from a datasheet (:data:`DATASHEETS`, dense
rates without structured sparsity). An op's lower-bound time on a device is
``max(flops / peak, bytes / bandwidth)``; an op whose arithmetic intensity (FLOPs per byte) is
above the device's ridge point ``peak / bandwidth`` is compute-bound, below it memory-bound.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from leantorch.errors import LeanError, describe

__all__ = ["DATASHEETS", "DeviceSpec", "calibrate", "resolve_device_spec"]

TERA = 1e12
GIGA = 1e9


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of a device.

    Args:
        name: e.g. ``"h100-sxm"`` or ``"cpu (measured)"``.
        matmul_flops: peak FLOP/s of matrix multiplication per dtype name (``"float32"``,
            ``"bfloat16"``...); dtypes not listed fall back to ``"float32"``.
        vector_flops: peak FLOP/s of non-matmul (elementwise) float32 work.
        bandwidth: main-memory bandwidth in bytes/s.
        source: where the numbers come from.
    """

    name: str
    matmul_flops: dict[str, float]
    vector_flops: float
    bandwidth: float
    source: str
    details: dict[str, object] = field(default_factory=dict)

    def peak(self, dtype: torch.dtype, matmul: bool = True) -> float:
        """Peak FLOP/s for ``dtype`` (integer ops use the ``int8`` entry when there is one)."""
        if not matmul:
            return self.vector_flops
        name = dtype_name(dtype)
        if not (dtype.is_floating_point or dtype.is_complex) and "int8" in self.matmul_flops:
            return self.matmul_flops["int8"]
        if name in self.matmul_flops:
            return self.matmul_flops[name]
        if name in ("float16", "bfloat16") and "bfloat16" in self.matmul_flops:
            return self.matmul_flops["bfloat16"]
        return self.matmul_flops.get("float32", self.vector_flops)

    def ridge(self, dtype: torch.dtype = torch.float32) -> float:
        """FLOPs per byte above which a matmul in ``dtype`` is compute-bound."""
        return self.peak(dtype) / self.bandwidth

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _gpu(name: str, fp32: float, half: float, bandwidth_tb: float, int8: float | None = None,
         tf32: float | None = None) -> DeviceSpec:
    rates = {"float32": fp32 * TERA, "bfloat16": half * TERA, "float16": half * TERA}
    if int8 is not None:
        rates["int8"] = int8 * TERA
    if tf32 is not None:
        rates["tf32"] = tf32 * TERA
    return DeviceSpec(name=name, matmul_flops=rates, vector_flops=fp32 * TERA,
                      bandwidth=bandwidth_tb * TERA,
                      source="vendor datasheet, dense rates without sparsity")


# Dense peak rates from the vendors' datasheets (TFLOP/s; TB/s). float32 is the plain (non
# tensor-core) rate; bfloat16/float16 are tensor-core rates with float32 accumulation.
DATASHEETS: dict[str, DeviceSpec] = {
    "v100-sxm2": _gpu("v100-sxm2", 15.7, 125.0, 0.900),
    "t4": _gpu("t4", 8.1, 65.0, 0.320, int8=130.0),
    "a10": _gpu("a10", 31.2, 125.0, 0.600, int8=250.0, tf32=62.5),
    "a100-sxm-40gb": _gpu("a100-sxm-40gb", 19.5, 312.0, 1.555, int8=624.0, tf32=156.0),
    "a100-sxm-80gb": _gpu("a100-sxm-80gb", 19.5, 312.0, 2.039, int8=624.0, tf32=156.0),
    "l4": _gpu("l4", 30.3, 121.0, 0.300, int8=242.0, tf32=60.0),
    "rtx4090": _gpu("rtx4090", 82.6, 165.2, 1.008, int8=660.6),
    "h100-sxm": _gpu("h100-sxm", 67.0, 989.4, 3.35, int8=1978.9, tf32=494.7),
    "h200": _gpu("h200", 67.0, 989.4, 4.8, int8=1978.9, tf32=494.7),
}
_GPU_NAMES = {  # substrings of torch.cuda.get_device_name() -> datasheet key
    "H200": "h200", "H100": "h100-sxm", "A100-SXM4-80GB": "a100-sxm-80gb", "A100": "a100-sxm-40gb",
    "L4": "l4", "A10": "a10", "T4": "t4", "V100": "v100-sxm2", "4090": "rtx4090",
}

_CALIBRATED: dict[tuple[str, str, int], DeviceSpec] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: object, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def calibrate(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    copy_mib: int = 128,
    repeats: int = 5,
) -> DeviceSpec:
    """Measure this machine's matmul peak (best of ``repeats`` ``size``-cubed matmuls) and its
    copy bandwidth (best of ``repeats`` copies of ``copy_mib`` MiB: read + write).

    Cached per (device, dtype, thread count) for the life of the process; takes well under a
    second on a CPU at the defaults.
    """
    device = torch.device(device)
    key = (str(device), dtype_name(dtype), torch.get_num_threads())
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    matmul_seconds = _best_seconds(lambda: torch.mm(a, b), device, repeats)
    matmul_rate = 2 * size**3 / matmul_seconds
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    copy_seconds = _best_seconds(lambda: dst.copy_(src), device, repeats)
    bandwidth = 2 * src.numel() * src.element_size() / copy_seconds
    rates = {dtype_name(dtype): matmul_rate}
    if dtype != torch.float32:
        rates["float32"] = calibrate(device, torch.float32, size, copy_mib, repeats).peak(
            torch.float32)
    spec = DeviceSpec(
        name=f"{device.type} (measured)",
        matmul_flops=rates,
        vector_flops=rates["float32"],
        bandwidth=bandwidth,
        source=(f"measured here: best of {repeats} {size}x{size} {dtype_name(dtype)} matmuls "
                f"and {copy_mib} MiB copies, {torch.get_num_threads()} threads"),
        details={"threads": torch.get_num_threads(), "matmul_size": size, "copy_mib": copy_mib},
    )
    _CALIBRATED[key] = spec
    return spec


def resolve_device_spec(
    spec: str | DeviceSpec | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> DeviceSpec | None:
    """``"auto"``: a CUDA device's datasheet when known, else measured here; a datasheet name;
    ``"measure"``: always measure; a :class:`DeviceSpec`; ``None``: no roofline."""
    if spec is None or isinstance(spec, DeviceSpec):
        return spec
    if not isinstance(spec, str):
        raise LeanError(
            f"device_spec must be 'auto', 'measure', a datasheet name, a DeviceSpec or None, "
            f"got {describe(spec)}"
        )
    key = spec.lower()
    if key in DATASHEETS:
        return DATASHEETS[key]
    if key == "measure" or (key == "auto" and device.type != "cuda"):
        return calibrate(device, dtype if dtype.is_floating_point else torch.float32)
    if key == "auto":
        name = torch.cuda.get_device_name(device)
        for fragment, sheet in _GPU_NAMES.items():
            if fragment in name:
                return DATASHEETS[sheet]
        return calibrate(device, dtype if dtype.is_floating_point else torch.float32)
    raise LeanError(
        f"device_spec={spec!r} is not known; use 'auto', 'measure', None, a DeviceSpec, or one "
        f"of: {', '.join(sorted(DATASHEETS))}"
    )
