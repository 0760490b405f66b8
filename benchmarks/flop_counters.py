"""leantorch's forward FLOP/MAC counts next to three other counters, with every difference
traced to where it comes from.

Models (batch 1, eval mode, float32, CPU): bert-base (seq 128), gpt2 (seq 128), vit-b16
(3x224x224), resnet50 (3x224x224), minilm (seq 128). Counters:

* leantorch ``profile``: ``flops`` (a MAC is 2 FLOPs, plus all non-matmul work), ``macs``,
  ``matmul_flops`` (= 2 * macs) and ``other_flops``;
* ``torch.utils.flop_counter.FlopCounterMode``: total and per-op FLOPs (2 per MAC, matmul-class
  ops with a registered formula only);
* fvcore ``FlopCountAnalysis``: jit-traced, one "flop" per MAC plus norm/pool terms, with the
  ops it could not count (``unsupported_ops``) and the modules it did not see called
  (``uncalled_modules``);
* torch-pruning ``count_ops_and_params``: forward hooks on the module types it knows.

For each model and counter the script records the ratio to leantorch's MACs and FLOPs and an
``explanations`` entry: each difference with its size in MACs or FLOPs, the evidence from the
per-op / per-module breakdowns, and a reconciliation that rebuilds the counter's total from
leantorch's numbers (``residual`` 0 means the explanation accounts for every FLOP).

Writes ``benchmarks/results/flop_counters.json`` and renders ``docs/flop_counters.md`` from it
(``--doc-only`` re-renders the doc from the JSON without counting again).

Run from the repository root: ``.venv/bin/python benchmarks/flop_counters.py``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from _common import (
    RESULTS_DIR,
    THREADS,
    error_text,
    machine_info,
    ratio,
    setup_threads,
    write_results,
)
from leantorch.io import atomic_write_text
from leantorch.measure import OpCall, profile
from leantorch.models import load_model

MODELS: dict[str, int | None] = {  # model -> seq_len (None: a vision model, 3x224x224)
    "bert-base": 128,
    "gpt2": 128,
    "vit-b16": None,
    "resnet50": None,
    "minilm": 128,
}
PEERS = ("FlopCounterMode", "fvcore", "torch_pruning")
PEER_LABELS = {"FlopCounterMode": "FlopCounterMode", "fvcore": "fvcore",
               "torch_pruning": "torch-pruning"}
REPO = Path(__file__).resolve().parent.parent
DOC_PATH = REPO / "docs" / "flop_counters.md"
JSON_PATH = RESULTS_DIR / "flop_counters.json"

# fvcore operator names (by_operator keys) that are matmul-class: one "flop" per MAC.
FVCORE_MATMUL = ("linear", "addmm", "matmul", "mm", "bmm", "einsum", "conv")
# fvcore's non-matmul handles -> (leantorch op, fvcore FLOPs per leantorch FLOP, why).
# leantorch: LayerNorm 5 per element + 1 each for weight and bias; eval BatchNorm 2 + 1 each
# for weight and bias; mean 1 per input element. fvcore: layer_norm 5 with affine, eval
# batch_norm 2 with affine, adaptive_avg_pool2d 1 per input element.
FVCORE_NON_MATMUL: dict[str, tuple[str, Fraction, str]] = {
    "layer_norm": ("aten.native_layer_norm", Fraction(5, 7),
                   "5 FLOPs per element (leantorch: 7 = 5 + weight + bias)"),
    "group_norm": ("aten.native_group_norm", Fraction(5, 7),
                   "5 FLOPs per element (leantorch: 7 = 5 + weight + bias)"),
    "batch_norm": ("aten.native_batch_norm", Fraction(2, 4),
                   "2 FLOPs per element in eval (leantorch: 4 = subtract, multiply, weight, "
                   "bias)"),
    "adaptive_avg_pool2d": ("aten.mean", Fraction(1, 1),
                            "1 FLOP per input element (leantorch's aten.mean: the same)"),
}
# torch-pruning module types whose hook counts matmul work (MACs, plus a bias term).
TP_MATMUL_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                   "ConvTranspose3d", "MultiheadAttention")


# --------------------------------------------------------------------------- small helpers
def fmt(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    return f"{int(n):,}"


def gfmt(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.3f}G"


def guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a peer; on failure record the error instead of crashing."""
    try:
        return fn(*args)
    except Exception as error:
        return {"error": error_text(error)}


def _tensor_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    values = out.values() if isinstance(out, dict) else out  # ModelOutput is a dict
    return tuple(v for v in values if isinstance(v, torch.Tensor))


class PositionalWrapper(nn.Module):
    """Tensors in by position, a tuple of every tensor output out: what jit tracing (fvcore)
    and positional hooks (torch-pruning) need. Returning every output (not only logits or
    last_hidden_state) keeps e.g. BERT's pooler alive in the trace."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.names:
            out = self.model(**dict(zip(self.names, tensors, strict=True)))
        else:
            out = self.model(*tensors)
        return _tensor_outputs(out)


PREFIX = "model."  # the wrapper's attribute name, stripped from peers' module paths


def _strip(path: str) -> str:
    return path[len(PREFIX):] if path.startswith(PREFIX) else ("" if path == "model" else path)


class AttentionCalls(TorchDispatchMode):
    """Records the shapes and flags of every fused-attention op that executes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if "scaled_dot_product" in name or "attention_forward" in name:
            call = OpCall(func, args, kwargs, None)
            q, k, v = call.arg("query"), call.arg("key"), call.arg("value")
            self.calls.append({
                "op": name, "query": list(q.shape), "key": list(k.shape),
                "value": list(v.shape), "is_causal": bool(call.arg("is_causal", False)),
                "attn_mask": call.arg("attn_mask") is not None,
            })
        return func(*args, **kwargs)


def causal_pairs(q_len: int, k_len: int) -> int:
    """(query, key) pairs a top-left aligned causal mask keeps, counted one row at a time."""
    return sum(min(i + 1, k_len) for i in range(q_len))


def attention_summary(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Attention MACs recomputed from the recorded shapes, independently of leantorch."""
    from torch.utils.flop_counter import sdpa_flop_count

    groups: dict[str, dict[str, Any]] = {}
    macs = full_macs = 0
    for c in calls:
        batch, heads, q_len, dim = c["query"]
        k_len, v_dim = c["key"][2], c["value"][3]
        pairs = causal_pairs(q_len, k_len) if c["is_causal"] else q_len * k_len
        macs += batch * heads * pairs * (dim + v_dim)
        full_macs += batch * heads * q_len * k_len * (dim + v_dim)
        key = json.dumps(c, sort_keys=True)
        if key not in groups:
            groups[key] = dict(c, calls=0, pairs_per_head=pairs, full_pairs_per_head=q_len * k_len,
                               flop_counter_formula_flops=sdpa_flop_count(
                                   c["query"], c["key"], c["value"]))
        groups[key]["calls"] += 1
    return {"calls": len(calls), "kinds": list(groups.values()), "macs_from_shapes": macs,
            "full_matrix_macs": full_macs}


# --------------------------------------------------------------------------- the counters
def run_leantorch(model: nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    report = profile(model, *args, input_kwargs=kwargs, latency=False, device_spec=None,
                     activations=False)
    f = report.forward
    ops = {name: {"calls": op["calls"], "flops": op["flops"], "macs": op["macs"],
                  "other_flops": op["flops"] - 2 * op["macs"]}
           for name, op in report.ops.items() if op["flops"] or op["macs"]}
    entries = {m.path: m for m in report.modules}
    own: dict[str, dict[str, int]] = defaultdict(lambda: {"modules": 0, "macs": 0, "flops": 0})
    for m in report.modules:
        if m.calls == 0:  # containers: their numbers are their children's
            continue
        macs = m.forward.macs - sum(entries[c].forward.macs for c in m.children)
        flops = m.forward.flops - sum(entries[c].forward.flops for c in m.children)
        if macs or flops:
            own[m.type]["modules"] += 1
            own[m.type]["macs"] += macs
            own[m.type]["flops"] += flops
    summary = {
        "flops": f.flops, "macs": f.macs, "matmul_flops": f.matmul_flops,
        "other_flops": f.other_flops, "params": report.params.total, "ops": ops,
        "zero_flop_ops": sorted(n for n, op in report.ops.items()
                                if not (op["flops"] or op["macs"])),
        "uncounted": report.uncounted,
        "own_cost_by_module_type": dict(sorted(own.items(), key=lambda kv: -kv[1]["flops"])),
    }
    return summary, report


def run_flop_counter_mode(model: nn.Module, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    by_op = {str(op): int(v) for op, v in counter.get_flop_counts()["Global"].items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


def run_fvcore(wrapper: nn.Module, inputs: tuple[torch.Tensor, ...],
               leaf_paths: list[str]) -> dict[str, Any]:
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        analysis = FlopCountAnalysis(wrapper, inputs)
        analysis.unsupported_ops_warnings(False)  # recorded below instead of logged
        analysis.uncalled_modules_warnings(False)
        total = int(analysis.total())
        by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
        unsupported = {k: int(v) for k, v in analysis.unsupported_ops().items()}
        uncalled = sorted(_strip(p) for p in analysis.uncalled_modules())
        by_module = analysis.by_module()
    messages = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
                       for w in caught})
    return {
        "total": total, "by_operator": by_operator, "unsupported_ops": unsupported,
        "uncalled_modules": uncalled,
        "python_warnings": {"count": len(caught), "distinct": messages[:8]},
        "leaf_module_counts": {p: int(by_module.get(PREFIX + p, 0)) for p in leaf_paths},
    }


def run_torch_pruning(wrapper: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    import torch_pruning as tp
    from torch_pruning.utils.op_counter import MODULES_MAPPING

    with torch.no_grad():
        macs, params, layer_flops, _ = tp.utils.count_ops_and_params(
            wrapper, inputs, layer_wise=True)
    per_module: dict[str, dict[str, Any]] = {}
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"modules": 0, "ops": 0})
    for path, module in wrapper.named_modules():
        if type(module) in MODULES_MAPPING:
            value = int(layer_flops.get(module) or 0)
            name = type(module).__name__
            per_module[_strip(path)] = {"type": name, "ops": value}
            by_type[name]["modules"] += 1
            by_type[name]["ops"] += value
    return {"macs": int(macs), "total": int(macs), "params": int(params),
            "by_module_type": dict(by_type), "per_module": per_module}


# --------------------------------------------------------------------------- explanations
def _attention_ops(lt: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {n: op for n, op in lt["ops"].items() if "attention" in n and op["macs"]}


def _other_label(name: str, op: dict[str, int]) -> str:
    """What the non-matmul FLOPs of a leantorch op are."""
    if op.get("macs") and "attention" in name:
        return f"scale + softmax in {name}"
    if op.get("macs"):
        return f"bias adds in {name}"
    return name


def _other_by_label(lt: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, int]:
    return {_other_label(n, op): op["other_flops"] for n, op in lt["ops"].items()
            if op["other_flops"] and n not in skip}


def _exact(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def _top(values: dict[str, int], k: int = 4) -> str:
    items = sorted(((n, v) for n, v in values.items() if v), key=lambda kv: -kv[1])
    return ", ".join(f"{n} {fmt(v)}" for n, v in items[:k])


def explain_attention(lt: dict[str, Any], attention: dict[str, Any]) -> dict[str, Any]:
    ops = _attention_ops(lt)
    lt_macs = sum(op["macs"] for op in ops.values())
    causal = any(k["is_causal"] for k in attention["kinds"])
    kinds = attention["kinds"]
    shape = kinds[0] if kinds else None
    formula_flops = sum(k["flop_counter_formula_flops"] * k["calls"] for k in kinds)
    text = (f"{attention['calls']} fused attention calls ({', '.join(ops) or 'none'}); "
            f"leantorch's {fmt(lt_macs)} attention MACs equal batch x heads x pairs x "
            "(d + d_v) recomputed from the recorded q/k/v shapes "
            f"({fmt(attention['macs_from_shapes'])})")
    if causal and shape is not None:
        text += (f"; the calls are causal (is_causal=True), so leantorch counts "
                 f"n(n+1)/2 = {fmt(shape['pairs_per_head'])} (query, key) pairs per head, not "
                 f"n^2 = {fmt(shape['full_pairs_per_head'])}: {fmt(lt_macs)} MACs instead of "
                 f"the full matrix's {fmt(attention['full_matrix_macs'])}; FlopCounterMode's own "
                 "SDPA formula (sdpa_flop_count, used for its CUDA kernels) ignores causality "
                 f"and would give {fmt(formula_flops)} FLOPs")
    return {
        "text": text, "leantorch_attention_macs": lt_macs, "by_op": ops,
        "macs_from_shapes": attention["macs_from_shapes"],
        "full_matrix_macs": attention["full_matrix_macs"], "causal": causal,
        "flop_counter_formula_flops_total": formula_flops,
        "holds": lt_macs == attention["macs_from_shapes"], "calls": attention["kinds"],
    }


def explain_flop_counter_mode(lt: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    from torch.utils.flop_counter import flop_registry

    items = []
    missing_macs = 0
    missing: dict[str, Any] = {}
    for name, op in lt["ops"].items():
        if not op["macs"]:
            continue
        namespace, _, short = name.partition(".")
        packet = getattr(getattr(torch.ops, namespace), short)
        if packet not in flop_registry:
            missing_macs += op["macs"]
            missing[name] = {"calls": op["calls"], "leantorch_macs": op["macs"],
                             "in_flop_counter_registry": False,
                             "in_peer_breakdown": name in peer["by_op"]}
    if missing:
        registered = sorted(str(k) for k in flop_registry if "attention" in str(k))
        items.append({
            "cause": "no_formula_for_cpu_attention",
            "amount_flops": 2 * missing_macs,
            "text": (f"FlopCounterMode has no formula for {', '.join(missing)}, the CPU kernel "
                     "scaled_dot_product_attention dispatches to, and no decomposition of it "
                     "(its attention formulas are for the flash/efficient/cudnn GPU kernels), "
                     f"so the attention matmuls QK^T and PV, {fmt(missing_macs)} MACs = "
                     f"{fmt(2 * missing_macs)} FLOPs, are missing: the op ran "
                     f"({sum(m['calls'] for m in missing.values())} calls) but is absent from "
                     "its per-op breakdown"),
            "evidence": {"ops": missing, "attention_ops_with_a_formula": registered},
        })
    other = _other_by_label(lt)
    items.append({
        "cause": "matmul_only",
        "amount_flops": lt["other_flops"],
        "text": (f"FlopCounterMode counts only matmul-class ops (2 FLOPs per MAC; its addmm "
                 f"formula is mm's, so even bias adds are left out); the {fmt(lt['other_flops'])} "
                 f"non-matmul FLOPs leantorch counts are absent: {_top(other, 5)}"),
        "evidence": {"leantorch_other_flops": other},
    })
    agree = {n: {"flop_counter_mode": v,
                 "leantorch_2x_macs": 2 * lt["ops"].get(n, {}).get("macs", 0)}
             for n, v in peer["by_op"].items()}
    holds = all(a["flop_counter_mode"] == a["leantorch_2x_macs"] for a in agree.values())
    items.append({
        "cause": "same_matmul_count",
        "amount_flops": 0,
        "text": ("on every op FlopCounterMode counts ("
                 + ", ".join(agree) + ") it reports exactly 2 x leantorch's MACs"
                 + ("" if holds else " -- NOT on all of them, see evidence")),
        "evidence": agree, "holds": holds,
    })
    expected = lt["flops"] - sum(i["amount_flops"] for i in items)
    return {
        "unit": "FLOPs",
        "convention": "FLOPs = 2 x MACs of the ops it has a formula for; nothing else",
        "items": items,
        "check": {"formula": "leantorch.flops - missing attention matmul FLOPs - "
                             "leantorch.other_flops",
                  "expected": expected, "peer": peer["total"],
                  "residual": peer["total"] - expected},
    }


def explain_fvcore(lt: dict[str, Any], peer: dict[str, Any], leaf: dict[str, dict[str, Any]],
                   attention_macs: int, modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    by_op = peer["by_operator"]
    matmul = {k: v for k, v in by_op.items() if k in FVCORE_MATMUL}
    matmul_total = sum(matmul.values())
    lt_matmul_ops = {n: op["macs"] for n, op in lt["ops"].items()
                     if op["macs"] and "attention" not in n}
    items = [{
        "cause": "one_flop_per_mac",
        "amount_macs": 0,
        "text": (f"fvcore counts one 'flop' per multiply-accumulate: its matmul-class operators "
                 f"({_top(matmul)}) total {fmt(matmul_total)}, a MAC count (leantorch: "
                 f"{fmt(lt['macs'])} MACs, {fmt(lt['flops'])} FLOPs); its linear/addmm/conv "
                 "handles count no bias add"),
        "evidence": {"fvcore_matmul_by_operator": matmul, "fvcore_matmul_total": matmul_total,
                     "leantorch_matmul_macs_by_op": lt_matmul_ops},
    }]
    sdpa_calls = {k: v for k, v in peer["unsupported_ops"].items() if "attention" in k}
    if attention_macs:
        items.append({
            "cause": "attention_unsupported",
            "amount_macs": attention_macs,
            "text": (f"fvcore has no handle for {', '.join(sdpa_calls) or 'the attention op'} "
                     f"({sum(sdpa_calls.values())} calls, listed in unsupported_ops), so the "
                     f"attention matmuls, {fmt(attention_macs)} MACs, are missing"),
            "evidence": {"unsupported_ops": sdpa_calls, "leantorch_attention_macs": attention_macs},
        })
    dropped = {p: {"type": m["type"], "calls": m["calls"], "leantorch_macs": m["macs"],
                   "fvcore": peer["leaf_module_counts"].get(p, 0),
                   "in_uncalled_modules": p in peer["uncalled_modules"]}
               for p, m in leaf.items() if m["macs"] and peer["leaf_module_counts"].get(p, 0) == 0}
    if dropped:
        dropped_macs = sum(d["leantorch_macs"] for d in dropped.values())
        items.append({
            "cause": "dead_code_dropped_by_trace",
            "amount_macs": dropped_macs,
            "text": (f"fvcore counts a jit trace, which drops work whose result the model never "
                     f"uses: {', '.join(dropped)} ran in eager mode ({fmt(dropped_macs)} MACs; "
                     "leantorch counts what ran) but its output is discarded, so fvcore counts 0 "
                     "and even lists it under uncalled_modules"),
            "evidence": dropped,
        })
    groups: dict[str, dict[str, Any]] = {"not_run": {}, "ran_no_flops": {}, "ran_with_flops": {}}
    for path in peer["uncalled_modules"]:
        info = modules.get(path, {"type": "?", "calls": 0, "flops": 0})
        key = ("not_run" if not info["calls"] else
               "ran_with_flops" if info["flops"] else "ran_no_flops")
        groups[key][path] = {"type": info["type"], "leantorch_calls": info["calls"],
                             "leantorch_flops": info["flops"]}

    def types(group: dict[str, Any]) -> str:
        counts: dict[str, int] = defaultdict(int)
        for v in group.values():
            counts[v["type"]] += 1
        return ", ".join(f"{t} x{c}" for t, c in counts.items()) or "none"

    if peer["uncalled_modules"]:
        items.append({
            "cause": "uncalled_modules",
            "amount_macs": 0,
            "text": (f"fvcore's uncalled_modules lists {len(peer['uncalled_modules'])} modules: "
                     f"{len(groups['not_run'])} did not run in eager mode either "
                     f"({types(groups['not_run'])}); {len(groups['ran_no_flops'])} ran but do no "
                     f"arithmetic, so the trace holds no op of theirs "
                     f"({types(groups['ran_no_flops'])}); {len(groups['ran_with_flops'])} ran "
                     "and do arithmetic"
                     + (f" ({', '.join(groups['ran_with_flops'])}: the dropped dead code above)"
                        if groups["ran_with_flops"] else "")),
            "evidence": {k: (v if k == "ran_with_flops" else types(v)) for k, v in
                         groups.items()},
        })
    missing = sum(i["amount_macs"] for i in items)
    matmul_residual = matmul_total - (lt["macs"] - missing)
    extras = {}
    predicted_extra = Fraction(0)
    for op, value in by_op.items():
        if op in FVCORE_MATMUL:
            continue
        lt_op, factor, why = FVCORE_NON_MATMUL.get(op, (None, None, "no known mapping"))
        lt_flops = lt["ops"].get(lt_op, {}).get("flops") if lt_op else None
        extras[op] = {"fvcore": value, "leantorch_op": lt_op, "leantorch_flops": lt_flops,
                      "ratio": ratio(value, lt_flops), "convention": why}
        predicted_extra += (factor * lt_flops) if (factor and lt_flops) else value
    if extras:
        items.append({
            "cause": "norm_and_pool_terms",
            "amount_macs": -sum(e["fvcore"] for e in extras.values()),
            "text": ("fvcore adds non-matmul terms to its MAC count with its own per-element "
                     "costs: " + "; ".join(
                         f"{op} {fmt(e['fvcore'])} = {e['convention']}, leantorch "
                         f"{e['leantorch_op']} {fmt(e['leantorch_flops'])} (ratio {e['ratio']})"
                         for op, e in extras.items())),
            "evidence": extras,
        })
    from fvcore.nn.jit_analysis import _IGNORED_OPS

    mapped = tuple(e["leantorch_op"] for e in extras.values() if e["leantorch_op"])
    covered = sum(e["leantorch_flops"] or 0 for e in extras.values())
    rest = _other_by_label(lt, skip=mapped)
    others = {k: v for k, v in peer["unsupported_ops"].items() if "attention" not in k}
    ignored = {n: op["other_flops"] for n, op in lt["ops"].items() if op["other_flops"]
               and "aten::" + n.partition(".")[2] in _IGNORED_OPS}
    items.append({
        "cause": "non_matmul_not_counted",
        "amount_flops": lt["other_flops"] - covered,
        "text": (f"the rest of leantorch's non-matmul work, {fmt(lt['other_flops'] - covered)} "
                 f"FLOPs ({_top(rest, 5)}), is not in fvcore's count: its linear/addmm/conv "
                 "handles ignore the bias, it lists "
                 f"{', '.join(f'{k} x{v}' for k, v in others.items()) or 'nothing else'} as "
                 "unsupported"
                 + (f", and skips {', '.join(ignored)} silently (fvcore's ignore list)"
                    if ignored else "")),
        "evidence": {"unsupported_ops": others, "silently_ignored": ignored,
                     "leantorch_other_flops": rest},
    })
    expected = Fraction(lt["macs"] - missing) + predicted_extra
    return {
        "unit": "MACs (fvcore calls them flops)",
        "convention": "one flop per MAC for matmul-class ops, plus norm/pool terms",
        "items": items,
        "check": {
            "formula": "leantorch.macs - attention MACs - trace-dropped MACs + "
                       "sum(fvcore per-element factor x leantorch FLOPs of layer_norm / "
                       "batch_norm / mean)",
            "expected": _exact(expected),
            "peer": peer["total"],
            "residual": _exact(peer["total"] - expected),
            "matmul_residual": matmul_residual,
        },
    }


def explain_torch_pruning(lt: dict[str, Any], peer: dict[str, Any],
                          leaf: dict[str, dict[str, Any]], model: nn.Module) -> dict[str, Any]:
    modules = dict(model.named_modules())
    counted = {p: m for p, m in peer["per_module"].items() if m["type"] in TP_MATMUL_TYPES}
    counted_macs = 0
    bias_terms = {"Linear": 0, "conv": 0}
    mismatched = {}
    for path, m in counted.items():
        info = leaf.get(path, {"macs": 0, "flops": 0, "calls": 0})
        module = modules[path]
        if m["type"] == "Linear":  # torch-pruning: out_features once per call, not per token
            bias = module.out_features * info["calls"] if module.bias is not None else 0
        else:  # convolutions: out_channels per output position, as leantorch
            bias = info["flops"] - 2 * info["macs"]
        counted_macs += info["macs"]
        bias_terms["Linear" if m["type"] == "Linear" else "conv"] += bias
        if m["ops"] != info["macs"] + bias:
            mismatched[path] = {"torch_pruning": m["ops"], "leantorch_macs": info["macs"],
                                "bias_term": bias}
    matmul_ops = sum(m["ops"] for m in counted.values())
    by_type = peer["by_module_type"]
    items = [{
        "cause": "hooks_on_linear_and_conv",
        "amount_macs": 0,
        "text": (f"torch-pruning counts one op per MAC in forward hooks of the module types it "
                 f"knows: {len(counted)} "
                 + "/".join(sorted({m['type'] for m in counted.values()}))
                 + f" modules, {fmt(counted_macs)} MACs, exactly leantorch's MACs for those "
                 "modules" + ("" if not mismatched else " -- except the modules in evidence")),
        "evidence": {"modules": len(counted), "leantorch_macs": counted_macs,
                     "mismatched_modules": mismatched},
    }]
    own = lt["own_cost_by_module_type"]
    unknown = {t: {"modules": v["modules"], "macs": v["macs"]} for t, v in own.items()
               if v["macs"] and t not in TP_MATMUL_TYPES}
    unknown_macs = sum(v["macs"] for v in unknown.values())
    if unknown:
        why = []
        if any("Attention" in t or "Attn" in t for t in unknown):
            why.append("attention modules call scaled_dot_product_attention as a function, so "
                       "no hook sees the attention matmuls")
        if "Conv1D" in unknown:
            why.append("transformers' Conv1D (GPT-2's projections) is not an nn.Linear")
        items.append({
            "cause": "matmul_outside_known_modules",
            "amount_macs": unknown_macs,
            "text": ("MACs executed by module types torch-pruning has no hook for are missing: "
                     + "; ".join(f"{t} {fmt(v['macs'])} ({v['modules']} modules)"
                                 for t, v in unknown.items())
                     + (" (" + "; ".join(why) + ")" if why else "")),
            "evidence": unknown,
        })
    lt_bias = {"Linear": 0, "conv": 0}
    for p, m in counted.items():
        if p in leaf:
            lt_bias["Linear" if m["type"] == "Linear" else "conv"] += (
                leaf[p]["flops"] - 2 * leaf[p]["macs"])
    bias_total = sum(bias_terms.values())
    text = (f"torch-pruning adds a bias term of out_features once per nn.Linear call, not once "
            f"per token: {fmt(bias_terms['Linear'])}, where leantorch counts "
            f"{fmt(lt_bias['Linear'])} bias-add FLOPs in the same modules (one per output "
            "element)")
    if bias_terms["conv"] or lt_bias["conv"]:
        text += (f"; for convolutions it adds out_channels per output position: "
                 f"{fmt(bias_terms['conv'])} (leantorch: {fmt(lt_bias['conv'])})")
    items.append({
        "cause": "bias_once_per_call",
        "amount_macs": -bias_total,
        "text": text,
        "evidence": {"torch_pruning_bias_terms": bias_terms, "leantorch_bias_flops": lt_bias},
    })
    non_matmul = {t: {"modules": v["modules"], "torch_pruning": v["ops"],
                      "leantorch_flops": own.get(t, {}).get("flops", 0),
                      "ratio": ratio(v["ops"], own.get(t, {}).get("flops", 0))}
                  for t, v in by_type.items() if t not in TP_MATMUL_TYPES and v["ops"]}
    if non_matmul:
        items.append({
            "cause": "norm_activation_pool_modules",
            "amount_macs": -sum(v["torch_pruning"] for v in non_matmul.values()),
            "text": ("it also adds, with its own per-element costs: " + "; ".join(
                f"{t} {fmt(v['torch_pruning'])} vs leantorch {fmt(v['leantorch_flops'])} "
                f"FLOPs (ratio {v['ratio']})" for t, v in non_matmul.items())
                + " (LayerNorm/BatchNorm: 2 per element with affine; ReLU: 1 per element; "
                  "pools: 1 per input element)"),
            "evidence": non_matmul,
        })
    not_hooked = {t: v["flops"] - 2 * v["macs"] for t, v in own.items()
                  if t not in by_type and v["flops"] - 2 * v["macs"]}
    items.append({
        "cause": "non_matmul_outside_known_modules",
        "amount_flops": sum(not_hooked.values()),
        "text": (f"non-matmul work outside hooked module types is not counted: "
                 f"{_top(not_hooked, 6)} FLOPs (leantorch's own FLOPs of those module types, "
                 "children excluded): bias adds inside unhooked matmul modules, transformers' "
                 "activation modules (GELUActivation, NewGELUActivation are not nn.GELU), and "
                 "residual adds, attention softmax and embedding sums done in functional "
                 "code"),
        "evidence": {"leantorch_own_other_flops_by_module_type": not_hooked},
    })
    expected_matmul = lt["macs"] - unknown_macs + bias_total
    return {
        "unit": "MACs (plus bias and norm/activation terms)",
        "convention": "module forward hooks: MACs of nn.Linear/nn.Conv*, plus bias, norm, "
                      "activation and pooling terms; nothing outside those module types",
        "items": items,
        "check": {
            "formula": "leantorch.macs - MACs outside known module types + bias terms + "
                       "torch-pruning's norm/activation/pool terms",
            "expected": expected_matmul + sum(v["torch_pruning"] for v in non_matmul.values()),
            "peer": peer["total"],
            "residual": peer["total"] - expected_matmul
                        - sum(v["torch_pruning"] for v in non_matmul.values()),
            "matmul_residual": matmul_ops - expected_matmul,
        },
    }


# --------------------------------------------------------------------------- one model
def analyse(name: str, seq_len: int | None) -> dict[str, Any]:
    loaded = load_model(name)
    model = loaded.model.eval()
    args, kwargs = loaded.example_inputs(batch=1, seq_len=seq_len)
    inputs = {f"arg{i}": list(a.shape) for i, a in enumerate(args)}
    inputs.update({k: list(v.shape) for k, v in kwargs.items()})
    lt, report = run_leantorch(model, args, kwargs)
    modules = {m.path: {"type": m.type, "calls": m.calls, "macs": m.forward.macs,
                        "flops": m.forward.flops} for m in report.modules}
    leaf = {m.path: modules[m.path]
            for m in report.modules if not m.children and m.calls and m.path}
    recorder = AttentionCalls()
    with torch.no_grad(), recorder:
        model(*args, **kwargs)
    attention = attention_summary(recorder.calls)

    names = list(kwargs)
    positional = tuple(args) + tuple(kwargs.values())
    wrapper = PositionalWrapper(model, names).eval()
    leaf_macs = [p for p, m in leaf.items() if m["macs"]]
    peers = {
        "FlopCounterMode": guarded(run_flop_counter_mode, model, args, kwargs),
        "fvcore": guarded(run_fvcore, wrapper, positional, leaf_macs),
        "torch_pruning": guarded(run_torch_pruning, wrapper, positional),
    }
    attention_expl = explain_attention(lt, attention)
    explanations: dict[str, Any] = {"attention": attention_expl}
    for peer_name, peer in peers.items():
        if "error" in peer:
            peer["ratio_to_leantorch_macs"] = peer["ratio_to_leantorch_flops"] = None
            explanations[peer_name] = {"error": peer["error"]}
            continue
        peer["ratio_to_leantorch_macs"] = ratio(peer["total"], lt["macs"])
        peer["ratio_to_leantorch_flops"] = ratio(peer["total"], lt["flops"])
        peer["ratio_to_leantorch_matmul_flops"] = ratio(peer["total"], lt["matmul_flops"])
        try:
            if peer_name == "FlopCounterMode":
                explanations[peer_name] = explain_flop_counter_mode(lt, peer)
            elif peer_name == "fvcore":
                explanations[peer_name] = explain_fvcore(
                    lt, peer, leaf, attention_expl["leantorch_attention_macs"], modules)
            else:
                explanations[peer_name] = explain_torch_pruning(lt, peer, leaf, model)
        except Exception as error:  # an explanation that cannot be built: say so
            explanations[peer_name] = {"error": f"explanation failed: {error_text(error)}"}
    peers["torch_pruning"].pop("per_module", None)  # large; by_module_type stays
    peers["fvcore"].pop("leaf_module_counts", None)
    return {
        "model": name, "class": type(model).__name__, "batch": 1, "seq_len": seq_len,
        "inputs": inputs, "training": model.training, "leantorch": lt, "peers": peers,
        "explanations": explanations,
    }


# --------------------------------------------------------------------------- output
def print_table(results: dict[str, Any]) -> None:
    header = (f"{'model':10s} {'leantorch FLOPs':>16s} {'leantorch MACs':>15s} "
              f"{'FlopCounterMode':>22s} {'fvcore':>20s} {'torch-pruning':>20s}")
    print(header)
    print("-" * len(header))
    for name, m in results["models"].items():
        lt, p = m["leantorch"], m["peers"]

        def cell(peer: dict[str, Any], key: str) -> str:
            if "error" in peer:
                return "error"
            return f"{gfmt(peer['total'])} ({peer[key]:.3f}x)"

        print(f"{name:10s} {gfmt(lt['flops']):>16s} {gfmt(lt['macs']):>15s} "
              f"{cell(p['FlopCounterMode'], 'ratio_to_leantorch_flops'):>22s} "
              f"{cell(p['fvcore'], 'ratio_to_leantorch_macs'):>20s} "
              f"{cell(p['torch_pruning'], 'ratio_to_leantorch_macs'):>20s}")
    print("(FlopCounterMode ratio: to leantorch FLOPs; fvcore and torch-pruning: to leantorch "
          "MACs)\n")
    for name, m in results["models"].items():
        print(f"== {name}")
        print(f"  attention: {m['explanations']['attention']['text']}")
        for peer in PEERS:
            expl = m["explanations"][peer]
            if "error" in expl:
                print(f"  {PEER_LABELS[peer]}: {expl['error']}")
                continue
            check = expl["check"]
            print(f"  {PEER_LABELS[peer]} (residual {check['residual']}):")
            for item in expl["items"]:
                print(f"    - {item['text']}")
        print()


def _doc_table(models: dict[str, Any]) -> list[str]:
    lines = [
        "| model | leantorch FLOPs | leantorch MACs | FlopCounterMode | fvcore | torch-pruning |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name, m in models.items():
        lt, p = m["leantorch"], m["peers"]
        cells = [fmt(p[k]["total"]) if "error" not in p[k] else "error" for k in PEERS]
        lines.append(f"| {name} | {fmt(lt['flops'])} | {fmt(lt['macs'])} | " + " | ".join(cells)
                     + " |")
    lines += ["", "Ratios to leantorch (peer ÷ leantorch):", "",
              "| model | FlopCounterMode ÷ FLOPs | FlopCounterMode ÷ 2·MACs | fvcore ÷ MACs "
              "| fvcore ÷ FLOPs | torch-pruning ÷ MACs | torch-pruning ÷ FLOPs |",
              "|---|--:|--:|--:|--:|--:|--:|"]
    for name, m in models.items():
        p = m["peers"]

        def r(peer: str, key: str, p: dict[str, Any] = p) -> str:
            value = p[peer].get(key)
            return "n/a" if value is None else f"{value:.4f}"

        lines.append(
            f"| {name} | {r('FlopCounterMode', 'ratio_to_leantorch_flops')} | "
            f"{r('FlopCounterMode', 'ratio_to_leantorch_matmul_flops')} | "
            f"{r('fvcore', 'ratio_to_leantorch_macs')} | {r('fvcore', 'ratio_to_leantorch_flops')}"
            f" | {r('torch_pruning', 'ratio_to_leantorch_macs')} | "
            f"{r('torch_pruning', 'ratio_to_leantorch_flops')} |")
    return lines


def _list(values: dict[str, Any]) -> str:
    return ", ".join(f"{n} {fmt(v)}" for n, v in values.items())


def _items(models: dict[str, Any], peer: str, cause: str) -> dict[str, dict[str, Any]]:
    """model -> the explanation item of ``peer`` with ``cause`` (models without one left out)."""
    found = {}
    for name, m in models.items():
        for item in m["explanations"].get(peer, {}).get("items", []):
            if item["cause"] == cause:
                found[name] = item
    return found


def render_markdown(results: dict[str, Any]) -> str:
    """The README section, every number taken from ``results`` (the JSON)."""
    models = results["models"]
    machine = results["machine"]

    def peer_ratio(model: str, peer: str, key: str) -> Any:
        return models.get(model, {}).get("peers", {}).get(peer, {}).get(key, "n/a")

    def ok(peer: str) -> bool:
        return any("check" in m["explanations"].get(peer, {}) for m in models.values())

    def resnet_note(peer: str, key: str, text: str) -> str:
        value = peer_ratio("resnet50", peer, key)
        return "" if value in (None, "n/a") else text.format(value)

    def amounts(peer: str, cause: str, key: str, sign: int = 1) -> str:
        return _list({n: sign * i[key] for n, i in _items(models, peer, cause).items()
                      if i.get(key)})

    residuals = [m["explanations"][p]["check"]["residual"] for m in models.values()
                 for p in PEERS if "check" in m["explanations"].get(p, {})]
    all_zero = bool(residuals) and all(r == 0 for r in residuals)
    lines = [
        "### How leantorch's counts compare with other FLOP counters",
        "",
        f"Forward pass, batch 1, eval mode, float32 on CPU (torch {machine['torch']}, "
        f"{results['threads']} threads); text models at sequence length 128, vision models at "
        "3x224x224. Made by `benchmarks/flop_counters.py`; "
        "`benchmarks/results/flop_counters.json` holds every number below with the per-op "
        "and per-module breakdowns. Conventions: leantorch FLOPs = 2 × MACs + all non-matmul "
        "work (bias adds, softmax, norms, activations, residual adds); FlopCounterMode "
        "reports FLOPs = 2 × MACs of the ops it has a formula for; fvcore reports MACs (it "
        "calls them flops) plus norm and pool terms; torch-pruning reports MACs of the module "
        "types it hooks plus bias, norm, activation and pooling terms.",
        "",
        *_doc_table(models),
        "",
        "Where each difference comes from. Each explanation is checked: the JSON rebuilds every "
        "counter's total from leantorch's per-op and per-module numbers plus the items below, "
        + ("and the residual is 0 for every model and counter."
           if all_zero else "see `check.residual` there."),
        "",
    ]
    if ok("FlopCounterMode"):
        fcm_attn = _items(models, "FlopCounterMode", "no_formula_for_cpu_attention")
        if fcm_attn:
            op = next(iter(next(iter(fcm_attn.values()))["evidence"]["ops"]))
            lines.append(
                f"- **FlopCounterMode misses attention on CPU.** `scaled_dot_product_attention` "
                f"runs as `{op}`, for which torch's flop registry has no formula (its attention "
                "formulas are for the flash / efficient / cudnn GPU kernels) and no decomposition, "
                "so the QK^T and PV matmuls are missing: "
                f"{amounts('FlopCounterMode', 'no_formula_for_cpu_attention', 'amount_flops')} "
                "FLOPs (2 × leantorch's attention MACs). On every op it does count (addmm, mm, "
                "convolution) it reports exactly 2 × leantorch's MACs.")
        lines.append(
            "- **FlopCounterMode counts matmuls only.** Bias adds (its addmm formula is mm's), "
            "attention scale and softmax, norms, activations and residual adds, leantorch's "
            "`other_flops`, are absent: "
            f"{amounts('FlopCounterMode', 'matmul_only', 'amount_flops')}"
            " FLOPs. With the item above this accounts for all of the gap: FlopCounterMode = 2 × "
            "(leantorch MACs − attention MACs)"
            + resnet_note("FlopCounterMode", "ratio_to_leantorch_matmul_flops",
                          "; resnet50 has no attention, so there it equals leantorch's "
                          "`matmul_flops` (ratio {})") + ".")
    for name, m in models.items():
        a = m["explanations"]["attention"]
        if not a["causal"]:
            continue
        kind = a["calls"][0]
        lines.append(
            f"- **Causal attention ({name}).** Its attention calls are causal, so leantorch "
            f"counts n(n+1)/2 = {fmt(kind['pairs_per_head'])} (query, key) pairs per head, not "
            f"n² = {fmt(kind['full_pairs_per_head'])}: {fmt(a['leantorch_attention_macs'])} "
            f"attention MACs instead of the full matrix's {fmt(a['full_matrix_macs'])}. "
            "FlopCounterMode's own SDPA formula ignores causality (where it applies, on the GPU "
            f"kernels, it would give {fmt(a['flop_counter_formula_flops_total'])} FLOPs for "
            "these calls).")
    if ok("fvcore"):
        per_mac = _items(models, "fvcore", "one_flop_per_mac")
        lines.append(
            "- **fvcore counts MACs and calls them flops**, one per multiply-accumulate, and its "
            "linear / addmm / conv handles count no bias add. Its matmul-class operators total "
            + _list({n: i["evidence"]["fvcore_matmul_total"] for n, i in per_mac.items()})
            + " against leantorch's "
            + _list({n: models[n]["leantorch"]["macs"] for n in per_mac})
            + " MACs; the next two items are the whole difference.")
        lines.append(
            "- **fvcore misses attention.** `aten::scaled_dot_product_attention` is in its "
            f"`unsupported_ops`: {amounts('fvcore', 'attention_unsupported', 'amount_macs')} MACs.")
        dead = _items(models, "fvcore", "dead_code_dropped_by_trace")
        if dead:
            paths = sorted({p for i in dead.values() for p in i["evidence"]})
            lines.append(
                f"- **fvcore drops work whose result is unused ({', '.join(dead)}).** It counts a "
                "jit trace, and tracing prunes dead code: the sentence encoder discards BERT's "
                f"pooler output, so `{', '.join(paths)}` (which runs in eager mode, and which "
                "leantorch counts) is missing from fvcore: "
                f"{amounts('fvcore', 'dead_code_dropped_by_trace', 'amount_macs')} MACs; fvcore "
                "even lists it in `uncalled_modules`.")
        norm = _items(models, "fvcore", "norm_and_pool_terms")
        lines.append(
            "- **fvcore adds norm and pool terms at its own rates**: layer_norm 5 per element "
            "(leantorch 7: + weight + bias), eval batch_norm 2 (leantorch 4), adaptive_avg_pool2d "
            "1 per input element (the same as leantorch's mean); fvcore vs leantorch: "
            + "; ".join(f"{n}: " + ", ".join(
                f"{op} {fmt(e['fvcore'])} vs {fmt(e['leantorch_flops'])}"
                for op, e in i["evidence"].items()) for n, i in norm.items())
            + resnet_note("fvcore", "ratio_to_leantorch_macs",
                          ". This is why fvcore exceeds leantorch's MACs on resnet50 "
                          "(ratio {})") + ".")
        rest = _items(models, "fvcore", "non_matmul_not_counted")
        ignored = {n: i["evidence"]["silently_ignored"] for n, i in rest.items()
                   if i["evidence"]["silently_ignored"]}
        lines.append(
            "- **fvcore leaves out the rest of the non-matmul work** (bias adds, attention "
            "softmax, "
            "GELU, residual adds, max-pool): "
            f"{amounts('fvcore', 'non_matmul_not_counted', 'amount_flops')} leantorch FLOPs. It "
            "reports most of these ops in `unsupported_ops`"
            + ("; some it skips without a word because they are on its ignore list: "
               + "; ".join(f"{n}: " + ", ".join(f"{op} {fmt(v)} FLOPs" for op, v in ops.items())
                           for n, ops in ignored.items()) if ignored else "")
            + ".")
    if ok("torch_pruning"):
        unknown = _items(models, "torch_pruning", "matmul_outside_known_modules")
        gpt2_ratio = models.get("gpt2", {}).get("peers", {}).get("torch_pruning", {}).get(
            "ratio_to_leantorch_macs")
        if unknown:
            lines.append(
                "- **torch-pruning only sees the module types it hooks** (nn.Linear, nn.Conv*, "
                "norms, ReLU, pools, nn.GELU, nn.MultiheadAttention); MACs executed anywhere "
                "else are missing: " + "; ".join(
                    f"{n}: " + ", ".join(f"{t} {fmt(v['macs'])}"
                                         for t, v in i["evidence"].items())
                    for n, i in unknown.items())
                + " MACs. Attention modules call `scaled_dot_product_attention` as a function, "
                "which no module hook sees, and GPT-2's projections are transformers' "
                "`Conv1D`, not `nn.Linear`"
                + (f", which is why torch-pruning reports {gpt2_ratio} × leantorch's MACs on "
                   "gpt2" if gpt2_ratio is not None else "")
                + ". On the modules it does hook, its MAC count equals leantorch's exactly.")
        bias = _items(models, "torch_pruning", "bias_once_per_call")
        conv_bias = {n: i["evidence"]["torch_pruning_bias_terms"]["conv"] for n, i in bias.items()
                     if i["evidence"]["torch_pruning_bias_terms"]["conv"]}
        lines.append(
            "- **torch-pruning's nn.Linear bias term is per call, not per token**: it adds "
            "out_features once per forward, where leantorch counts one add per output element; "
            "torch-pruning vs leantorch: " + "; ".join(
                f"{n} {fmt(i['evidence']['torch_pruning_bias_terms']['Linear'])} vs "
                f"{fmt(i['evidence']['leantorch_bias_flops']['Linear'])}"
                for n, i in bias.items() if i["evidence"]["leantorch_bias_flops"]["Linear"])
            + (". For convolutions both count one add per output position ("
               + "; ".join(f"{n} {fmt(v)}" for n, v in conv_bias.items()) + ")"
               if conv_bias else "")
            + ".")
        tp_norm = _items(models, "torch_pruning", "norm_activation_pool_modules")
        lines.append(
            "- **torch-pruning adds norm, activation and pool terms at its own rates** (LayerNorm "
            "and BatchNorm 2 per element, ReLU 1, pools 1 per input element); torch-pruning vs "
            "leantorch FLOPs of the same modules: " + "; ".join(
                f"{n}: " + ", ".join(f"{t} {fmt(v['torch_pruning'])} vs {fmt(v['leantorch_flops'])}"
                                     for t, v in i["evidence"].items())
                for n, i in tp_norm.items())
            + resnet_note("torch_pruning", "ratio_to_leantorch_macs",
                          ". Hence its ratio above 1 on resnet50 ({})") + ".")
        lines.append(
            "- **torch-pruning leaves out non-matmul work outside hooked modules**: transformers' "
            "GELUActivation / NewGELUActivation are not nn.GELU, and residual adds, attention "
            "softmax and the bias adds of unhooked Conv1D happen where no hook looks: "
            f"{amounts('torch_pruning', 'non_matmul_outside_known_modules', 'amount_flops')} "
            "leantorch FLOPs.")
    for peer in PEERS:
        failed = {n: m["explanations"][peer]["error"] for n, m in models.items()
                  if "error" in m["explanations"].get(peer, {})}
        if failed:
            lines.append(f"- **{PEER_LABELS[peer]} failed** on " + "; ".join(
                f"{n} (`{e}`)" for n, e in failed.items()) + ".")
    uncounted = {n: m["leantorch"]["uncounted"] for n, m in models.items()
                 if m["leantorch"]["uncounted"]}
    lines.append(
        "- leantorch's `uncounted` is empty for every model here: every op that ran has a "
        "formula."
        if not uncounted else f"- leantorch's `uncounted` ops: {uncounted}.")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--doc", type=Path, default=DOC_PATH,
                        help="Markdown file rendered from the results (default: %(default)s)")
    parser.add_argument("--no-doc", action="store_true", help="do not write the Markdown")
    parser.add_argument("--doc-only", action="store_true",
                        help="re-render the Markdown from the existing JSON, count nothing")
    options = parser.parse_args(argv)
    if options.doc_only:
        results = json.loads(JSON_PATH.read_text(encoding="utf-8"))
        atomic_write_text(options.doc, render_markdown(results))
        print(f"wrote {options.doc}")
        return
    threads = setup_threads(THREADS)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "flop_counters",
        "description": "total forward FLOPs/MACs of leantorch vs FlopCounterMode, fvcore and "
                       "torch-pruning, with the differences explained and reconciled",
        "threads": threads,
        "machine": machine_info(),
        "models": {},
    }
    for name in options.models:
        print(f"counting {name} ...", flush=True)
        results["models"][name] = analyse(name, MODELS[name])
    results["script_seconds"] = round(time.perf_counter() - started, 1)
    print()
    print_table(results)
    path = write_results("flop_counters", results)
    print(f"wrote {path} in {results['script_seconds']} s")
    if not options.no_doc:
        atomic_write_text(options.doc, render_markdown(results))
        print(f"wrote {options.doc}")


if __name__ == "__main__":
    main()
