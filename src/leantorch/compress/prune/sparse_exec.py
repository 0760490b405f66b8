"""Sparse execution of pruned Linear layers: CSR and block-sparse (BSR) matmuls that skip the
zeros, wrapped as :class:`SparseLinear`, which :func:`make_sparse` swaps in.

Formats:

* ``"csr"``: compressed sparse rows, one value and one column index per kept weight, run by
  ``torch.sparse.mm`` (MKL's sparse BLAS on a CPU build with MKL, cuSPARSE on CUDA).
* ``"bsr"``: block sparse rows, one ``b x b`` tile of values and one column index per kept
  tile; only kept tiles are multiplied (``torch.sparse.mm`` on a BSR tensor).

Whether this is faster than the dense matmul depends on the density, the shape and the
machine; ``benchmarks/sparse_matmul.py`` measures where it wins on this CPU (see
``docs/sparsity.md``). A masked layer costs what a dense layer costs; a :class:`SparseLinear`
is counted by ``leantorch.measure`` as the multiply-accumulates it executes (kept weights or
kept tiles times rows), through formulas registered for its two ops.

The forward pass is the sparse kernel. The backward pass (so a sparse model can still be
fine-tuned at fixed sparsity) gives gradients for the input, the kept values and the bias:
for CSR with sparse ops (``dense @ csr`` and a sampled matmul), for BSR through the dense
weight (CPU torch has no ``dense @ bsr``), which costs dense time and memory.

The readable references :func:`csr_linear_reference` and :func:`bsr_linear_reference` loop
over rows and tiles; every fast path is tested against them and against the dense layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from leantorch import validate
from leantorch.compress.change import Change, apply_transform, replace_module, select_modules
from leantorch.compress.prune.masks import (
    _is_transformers_conv1d,
    is_prunable,
    prunable_modules,
)
from leantorch.compress.registry import register_transform
from leantorch.errors import LeanError, describe
from leantorch.measure import Cost, register_formula
from leantorch.serialize import register_module

__all__ = [
    "BREAK_EVEN_SPARSITY",
    "FORMATS",
    "SparseLinear",
    "bsr_linear",
    "bsr_linear_reference",
    "csr_linear",
    "csr_linear_reference",
    "make_sparse",
]

FORMATS = ("csr", "bsr")
_DTYPES = (torch.float32, torch.float64)  # what torch's CPU sparse matmuls accept

# torch warns once per process (TORCH_WARN_ONCE) that compressed sparse layouts are "in beta";
# they are what this module is built on, so spend that one warning here, silenced
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.zeros(1, 1).to_sparse_csr()


# --------------------------------------------------------------------------- references
def csr_linear_reference(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` with ``W`` in CSR, one output feature at a time.

    x: (rows, in_features); crow_indices: (out_features + 1,); col_indices, values: (nnz,);
    the kept weights of output ``o`` are ``values[crow[o]:crow[o + 1]]`` at input columns
    ``col_indices[crow[o]:crow[o + 1]]``. Returns (rows, out_features).
    """
    columns = []
    for o in range(out_features):
        start, end = int(crow_indices[o]), int(crow_indices[o + 1])
        picked = x[:, col_indices[start:end].long()]  # (rows, kept in row o)
        columns.append(picked @ values[start:end])
    y = torch.stack(columns, dim=1) if columns else x.new_zeros(x.shape[0], 0)
    return y if bias is None else y + bias


def bsr_linear_reference(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` with ``W`` in BSR, one ``b x b`` tile at a time.

    x: (rows, in_features); values: (tiles, b, b); tile ``k`` of block row ``r``
    (``crow[r] <= k < crow[r + 1]``) sits at input block column ``col_indices[k]``.
    Returns (rows, out_features).
    """
    b = values.shape[-1]
    y = x.new_zeros(x.shape[0], out_features)
    for r in range(out_features // b):
        for k in range(int(crow_indices[r]), int(crow_indices[r + 1])):
            c = int(col_indices[k])
            y[:, r * b:(r + 1) * b] += x[:, c * b:(c + 1) * b] @ values[k].T
    return y if bias is None else y + bias


# --------------------------------------------------------------------------- fast paths
def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
         shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _bsr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
         shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_bsr_tensor(crow, col, values, shape, check_invariants=False)


def _sparse_forward(weight: torch.Tensor, x: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    # sparse @ dense is the product torch's sparse BLAS runs well (dense @ sparse is far
    # slower on CPU); the result is y.T, returned as a transposed view to avoid a copy.
    # addmm starting from the broadcast bias skips the zero-fill that sparse.mm does first.
    if bias is None:
        return torch.addmm(x.new_zeros(1, 1), weight, x.t(), beta=0).t()
    return torch.addmm(bias[:, None], weight, x.t()).t()


@torch.library.custom_op("leantorch::csr_linear", mutates_args=())
def csr_linear(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """CSR sparse linear: same arguments and result as :func:`csr_linear_reference`."""
    weight = _csr(crow_indices, col_indices, values, (out_features, x.shape[1]))
    return _sparse_forward(weight, x, bias)


@torch.library.custom_op("leantorch::bsr_linear", mutates_args=())
def bsr_linear(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """Block-sparse linear: same arguments and result as :func:`bsr_linear_reference`."""
    weight = _bsr(crow_indices, col_indices, values, (out_features, x.shape[1]))
    return _sparse_forward(weight, x, bias)


@csr_linear.register_fake
@bsr_linear.register_fake
def _(x, crow_indices, col_indices, values, bias, out_features):
    return x.new_empty(out_features, x.shape[0]).t()


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, crow, col, values, bias, out_features = inputs
    ctx.save_for_backward(x, crow, col, values)
    ctx.out_features = out_features
    ctx.has_bias = bias is not None


def _csr_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    x, crow, col, values = ctx.saved_tensors
    weight = _csr(crow, col, values, (ctx.out_features, x.shape[1]))
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ weight  # (rows, out) @ (out, in), dense @ csr
    if ctx.needs_input_grad[3]:
        # d values = (grad.T @ x) sampled at the kept positions (SDDMM), never densified
        sampled = torch.sparse.sampled_addmm(weight, grad.t().contiguous(), x, beta=0.0)
        grad_values = sampled.values()
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.sum(0)
    return grad_x, None, None, grad_values, grad_bias, None


def _bsr_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    x, crow, col, values = ctx.saved_tensors
    out_features, b = ctx.out_features, values.shape[-1]
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        dense = _bsr(crow, col, values, (out_features, x.shape[1])).to_dense()
        grad_x = grad @ dense
    if ctx.needs_input_grad[3]:
        full = (grad.t() @ x).reshape(out_features // b, b, x.shape[1] // b, b)
        rows = torch.repeat_interleave(torch.arange(out_features // b, device=x.device),
                                       crow.diff().long())
        grad_values = full[rows, :, col.long(), :]  # (tiles, b, b)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.sum(0)
    return grad_x, None, None, grad_values, grad_bias, None


csr_linear.register_autograd(_csr_backward, setup_context=_setup)
bsr_linear.register_autograd(_bsr_backward, setup_context=_setup)


@register_formula(torch.ops.leantorch.csr_linear)
@register_formula(torch.ops.leantorch.bsr_linear)
def _sparse_cost(call: Any) -> Cost:
    """Stored values x rows MACs: the kept weights (CSR), or the kept tiles x b^2 (BSR: a kept
    tile is multiplied whole, zeros inside included); plus the bias adds."""
    rows = call.arg("x").shape[0]
    macs = rows * call.arg("values").numel()
    bias_adds = rows * call.arg("out_features") if call.arg("bias") is not None else 0
    return Cost(macs=macs, flops=2 * macs + bias_adds)


# --------------------------------------------------------------------------- module
@register_module(name="leantorch.SparseLinear")
class SparseLinear(nn.Module):
    """A Linear layer whose weight is stored and multiplied sparse (CSR or BSR).

    Parameters: ``values`` (the kept weights: ``(nnz,)`` for CSR, ``(tiles, b, b)`` for BSR)
    and ``bias`` ``(out_features,)``. Buffers: ``crow_indices`` ``(rows + 1,)`` and
    ``col_indices`` ``(nnz or tiles,)``, int32, where rows are output features (CSR) or
    block rows (BSR). Input ``(..., in_features)``, output ``(..., out_features)``.
    Build one with :meth:`from_dense` (or :func:`make_sparse` on a whole model).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        format: str = "csr",
        nnz: int = 0,
        block_size: int = 1,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise LeanError(f"SparseLinear: format must be one of {', '.join(FORMATS)}, got "
                            f"{describe(format)}")
        if format == "csr" and block_size != 1:
            raise LeanError(f"SparseLinear: format='csr' stores single weights, block_size "
                            f"must be 1, got {block_size}")
        if format == "bsr" and (out_features % block_size or in_features % block_size):
            raise LeanError(f"SparseLinear: format='bsr' needs in_features ({in_features}) and "
                            f"out_features ({out_features}) to be multiples of block_size "
                            f"({block_size})")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.format, self.block_size = format, block_size
        rows = out_features // block_size
        shape = (nnz,) if format == "csr" else (nnz, block_size, block_size)
        self.values = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.register_buffer("crow_indices", torch.zeros(rows + 1, dtype=torch.int32))
        self.register_buffer("col_indices", torch.zeros(nnz, dtype=torch.int32))

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        format: str = "csr",
        block_size: int = 1,
    ) -> SparseLinear:
        """Store the non-zeros of ``weight: (out_features, in_features)`` (for BSR: the tiles
        holding any non-zero, whole). ``bias: (out_features,)`` or None."""
        if weight.dim() != 2:
            raise LeanError(f"SparseLinear.from_dense: weight must be 2-D (out, in), got shape "
                            f"{list(weight.shape)}")
        if weight.dtype not in _DTYPES:
            raise LeanError(f"SparseLinear.from_dense: weight dtype must be float32 or float64 "
                            f"(what torch's sparse matmuls accept), got {weight.dtype}")
        weight = weight.detach()
        out_features, in_features = weight.shape
        if format == "bsr":
            cls(in_features, out_features, False, format, 0, block_size)  # validates shapes
            sparse = weight.to_sparse_bsr((block_size, block_size))
        elif format == "csr":
            if block_size != 1:
                raise LeanError(f"SparseLinear.from_dense: format='csr' needs block_size=1, "
                                f"got {block_size}")
            sparse = weight.to_sparse_csr()
        else:
            raise LeanError(f"SparseLinear.from_dense: format must be one of "
                            f"{', '.join(FORMATS)}, got {describe(format)}")
        values = sparse.values()
        layer = cls(in_features, out_features, bias is not None, format, values.shape[0],
                    block_size, dtype=weight.dtype).to(weight.device)
        with torch.no_grad():
            layer.values.copy_(values)
            layer.crow_indices.copy_(sparse.crow_indices())
            layer.col_indices.copy_(sparse.col_indices())
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def spec(self) -> dict[str, Any]:
        """Constructor arguments: ``in_features``, ``out_features``, ``bias`` (bool), ``format``
        (``"csr"`` or ``"bsr"``), ``nnz`` (stored values), ``block_size`` and the value ``dtype``."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "format": self.format,
                "nnz": int(self.values.shape[0]), "block_size": self.block_size,
                "dtype": str(self.values.dtype).removeprefix("torch.")}

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight this layer multiplies by."""
        build = _csr if self.format == "csr" else _bsr
        return build(self.crow_indices, self.col_indices, self.values.detach(),
                     (self.out_features, self.in_features)).to_dense()

    @property
    def density(self) -> float:
        """Stored weights over ``out_features * in_features`` (BSR: zeros inside kept tiles
        count as stored)."""
        return self.values.numel() / (self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in_features)`` -> ``(..., out_features)`` by a sparse-times-dense product."""
        if x.shape[-1] != self.in_features:
            raise LeanError(f"SparseLinear: input has {x.shape[-1]} features in its last "
                            f"dimension, expected in_features={self.in_features}")
        op = csr_linear if self.format == "csr" else bsr_linear
        flat = x.reshape(-1, self.in_features)
        y = op(flat, self.crow_indices, self.col_indices, self.values, self.bias,
               self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.format == "bsr" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}{block}, density={self.density:.3f}, "
                f"bias={self.bias is not None}")


# --------------------------------------------------------------------------- transform
def _layer_matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight the layer multiplies by, masks applied."""
    weight = module.weight  # a parametrized weight is computed with its mask
    return weight.t() if _is_transformers_conv1d(module) else weight


#: The sparsity (fraction of zero weights for CSR, of zero tiles for BSR) from which a sparse
#: matmul beats the dense one, per format: one minus the median crossover density measured by
#: ``benchmarks/sparse_matmul.py`` (``benchmarks/results/sparse_matmul.json``: Linear 768x3072
#: and 3072x768, 1, 128 and 1024 rows, unstructured / N:M / 16- and 32-blocks, fp32, 2 threads,
#: Intel Xeon). CSR crossovers spanned densities 0.02-0.27 with median 0.153 over 23 cases (one
#: case never won); BSR 0.05-0.28 with median 0.204 over 12 cases. Below these sparsities a
#: SparseLinear is most likely slower than the dense layer it replaces.
BREAK_EVEN_SPARSITY = {"csr": 0.85, "bsr": 0.80}


@register_transform("prune.make_sparse")
def make_sparse(
    model: nn.Module,
    *,
    format: str = "csr",
    block_size: int = 16,
    min_sparsity: float | None = None,
    force: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_inputs: Any = None,
    inplace: bool = False,
) -> tuple[nn.Module, Change]:
    """Replace every selected Linear (and transformers ``Conv1D``) by a :class:`SparseLinear`
    holding its non-zero weights (a masked weight is taken as masked), where sparse execution
    pays. Layers left dense are listed in ``Change.skipped`` with the reason; convolutions
    are not converted.

    Args:
        format: ``"csr"`` or ``"bsr"`` (tiles of ``block_size``; both weight sides must be
            multiples).
        block_size: side of the square BSR tiles (unused with ``"csr"``).
        min_sparsity: leave a layer dense when fewer than this fraction of its weights (CSR)
            or tiles (BSR) are zero; None (default) takes the format's measured break-even,
            :data:`BREAK_EVEN_SPARSITY` (0.85 for CSR, 0.80 for BSR, from
            ``benchmarks/results/sparse_matmul.json``), so a dense layer is not swapped for a
            slower sparse one.
        force: convert every eligible layer whatever its sparsity (for tests, or a machine
            measured to break even sooner); not together with ``min_sparsity``.
        include: ``fnmatch`` globs over module paths (``"encoder.layer.*"``); only
            Linear layers matching one are changed (None: all of them).
        exclude: globs of module paths left as they are, even when ``include`` matches.
    """
    if format not in FORMATS:
        raise LeanError(f"prune.make_sparse: format must be one of {', '.join(FORMATS)}, got "
                        f"{describe(format)}")
    if not isinstance(force, bool):
        raise LeanError(f"prune.make_sparse: force={describe(force)}; expected True or False")
    if force and min_sparsity is not None:
        raise LeanError(f"prune.make_sparse: force=True converts whatever the sparsity, so "
                        f"min_sparsity={describe(min_sparsity)} would not apply; give one of "
                        "them")
    if min_sparsity is not None:
        min_sparsity = validate.ratio("prune.make_sparse", "min_sparsity", min_sparsity,
                                      include_high=True)
    threshold = 0.0 if force else (BREAK_EVEN_SPARSITY[format] if min_sparsity is None
                                   else min_sparsity)
    b = block_size if format == "bsr" else 1

    def edit(target: nn.Module, change: Change) -> None:
        if is_prunable(target):
            raise LeanError("prune.make_sparse: the model is a single layer; use "
                            "SparseLinear.from_dense(layer.weight, layer.bias) instead")
        untied = {path for path, _ in prunable_modules(target, include, exclude,
                                                       change.skipped)}
        for path, module in select_modules(target, nn.Module, include, exclude):
            if not is_prunable(module) or path not in untied:
                continue  # not a layer, or tied to another (the reason is in skipped)
            if not (isinstance(module, nn.Linear) or _is_transformers_conv1d(module)):
                change.skipped[path] = "convolutions have no sparse execution path here"
                continue
            weight = _layer_matrix(module)
            bias = module.bias
            rows, cols = weight.shape
            if weight.dtype not in _DTYPES:
                change.skipped[path] = f"dtype {weight.dtype}: sparse matmuls need fp32/fp64"
                continue
            if rows % b or cols % b:
                change.skipped[path] = f"{rows}x{cols} is not a multiple of block_size={b}"
                continue
            tiles = (weight != 0).reshape(rows // b, b, cols // b, b).any(3).any(1)
            sparsity = 1 - tiles.float().mean().item()
            if sparsity < threshold:
                why = "" if min_sparsity is not None else (
                    f", the measured break-even of sparse {format} (below it a dense matmul "
                    "is faster; benchmarks/results/sparse_matmul.json)")
                change.skipped[path] = (f"sparsity {sparsity:.3f} below min_sparsity="
                                        f"{threshold:g}{why}; force=True converts anyway")
                continue
            layer = SparseLinear.from_dense(weight, bias, format, b)
            replace_module(target, path, layer)
            change.replaced.append(path)
            change.details.setdefault("density", {})[path] = round(layer.density, 6)

    return apply_transform("prune.make_sparse", model, edit,
                           params={"format": format, "block_size": b,
                                   "min_sparsity": threshold, "force": force,
                                   "include": include,
                                   "exclude": exclude},
                           example_inputs=example_inputs, inplace=inplace)
