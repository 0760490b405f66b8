"""Precision: latency and fidelity of the real all-MiniLM-L6-v2 encoder in float32, bfloat16
(cast and autocast) and int8 (leantorch's paths and the peers'), side by side in one process.

Shapes (CPU, eval, ``torch.no_grad``): 32 x 128 and 8 x 128 tokens (bundled sentences joined
until a passage fills 128 tokens; ``--shapes``). Variants:

* ``fp32``: the float32 model.
* ``bf16 cast``: ``quant.bf16`` (float32 islands: norms, softmax, pooling); ``plain bf16
  cast``: ``model.to(torch.bfloat16)``, every tensor cast (what the issue measured).
* ``autocast bf16``: the float32 model under ``torch.autocast("cpu", torch.bfloat16)``.
* ``leantorch int8 (old default)``: ``quant.int8_dynamic(share_quantization=False)``, the
  path before the fast-path knobs; ``leantorch int8 shared``: the new default (one quantize
  pass for q/k/v); ``leantorch int8 bf16``: ``compute_dtype="bfloat16"`` (everything outside
  the int8 GEMMs in bfloat16, layer norms float32); ``leantorch int8 bf16 compiled``: the
  same with ``compile=True`` (the per-token quantization through ``torch.compile``; its
  compilation happens in the warm-up, before any timing).
* ``torch.ao dynamic (x86)`` / ``(onednn)``: ``torch.ao.quantization.quantize_dynamic``.
* ``torchao int8 dyn``: ``Int8DynamicActivationInt8WeightConfig`` (torchao from
  ``.venv/torchao-peer``, put on ``sys.path`` as in ``benchmarks/quant.py``; when it is missing
  the row says why).

Two timings: 2-thread wall time, interleaved rounds (``_common.interleaved_timings``; the
per-round ratio's spread is kept), and 1-thread CPU time (``thread_time``), which does not count
the time a process waits for a core on a shared machine. Fidelity: cosine similarity of each
variant's sentence embeddings to float32's, mean and min, on the held-out sentences of
``leantorch.data.corpora`` (batches of 32), and on its second text set (Python reference text). Hardware path: the oneDNN primitives each variant ran
(``ONEDNN_VERBOSE``, captured from one forward pass at the first shape; e.g.
``matmul brg_matmul:avx10_1_512_amx`` is oneDNN's AMX GEMM) and the machine block.

Run: ``benchmarks/precision.py [--rounds N] [--cpu-rounds N] [--quick]``; writes
``benchmarks/results/precision.json`` (``--quick``: a smoke run that writes nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _common import (
    THREADS,
    error_text,
    machine_info,
    ratio,
    repeated_timings,
    setup_threads,
    write_results,
)
from quant import (
    cosine_stats,
    minilm_inputs,
    single_thread_cpu_times,
    torch_ao_dynamic,
    torchao_quantized,
    torchao_version,
)

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]
# quant.py looks beside the repository's .venv; a worktree without one uses the interpreter's
TORCHAO_DIR = next((p for p in (Path(__file__).resolve().parents[1] / ".venv" / "torchao-peer",
                                Path(sys.prefix) / "torchao-peer") if p.is_dir()), None)
if TORCHAO_DIR is not None and str(TORCHAO_DIR) not in sys.path:
    sys.path.append(str(TORCHAO_DIR))


# --------------------------------------------------------------------------- variants
def bf16_cast(model: nn.Module) -> tuple[nn.Module, str]:
    """leantorch's ``quant.bf16``: bfloat16 with float32 islands (norms, softmax, pooling)."""
    from leantorch.compress.quant import bf16

    return bf16(model)[0], "quant.bf16 (float32 islands: norms, softmax, pooling; sdpa attention)"


def plain_bf16_cast(model: nn.Module) -> nn.Module:
    """The plain ``model.to(torch.bfloat16)`` the issue measured: no float32 islands at all."""
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


def build_variants(model: nn.Module) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """name -> {"run": inputs -> embeddings, "what", "engine"}; and name -> why not built."""
    from leantorch.compress.quant import int8_dynamic

    variants: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}

    def add(name: str, what: str, make: Callable[[], Forward], engine: str | None = None
            ) -> None:
        try:
            variants[name] = {"run": make(), "what": what, "engine": engine}
        except Exception as error:  # a peer that does not run here: say why, keep going
            failed[name] = error_text(error)

    def plain(built: nn.Module) -> Forward:
        built.eval()
        return lambda inputs: built(**inputs)

    def autocast() -> Forward:
        def run(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(**inputs)
        return run

    def engine_bound(built: nn.Module, engine: str) -> Forward:
        def run(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            torch.backends.quantized.engine = engine
            try:
                return built(**inputs)
            finally:
                torch.backends.quantized.engine = "x86"
        return run

    cast, how = bf16_cast(model)
    add("fp32", "float32 model", lambda: plain(model))
    add("bf16 cast", how, lambda: plain(cast))
    add("plain bf16 cast", "model.to(torch.bfloat16): every tensor, norms and pooling included",
        lambda: plain(plain_bf16_cast(model)))
    add("autocast bf16", "torch.autocast('cpu', torch.bfloat16) around the float32 model",
        autocast)
    add("leantorch int8 (old default)", "quant.int8_dynamic(share_quantization=False): "
        "float32 outside the int8 GEMMs, one quantize pass per layer",
        lambda: plain(int8_dynamic(model, share_quantization=False)[0]))
    add("leantorch int8 shared", "quant.int8_dynamic() (new default: q/k/v share one "
        "quantize pass)", lambda: plain(int8_dynamic(model)[0]))
    add("leantorch int8 bf16", "quant.int8_dynamic(compute_dtype='bfloat16'): attention, "
        "GELU, residuals, embeddings in bfloat16; layer norms float32; GEMM writes bfloat16",
        lambda: plain(int8_dynamic(model, compute_dtype="bfloat16")[0]))
    add("leantorch int8 bf16 compiled", "quant.int8_dynamic(compute_dtype='bfloat16', "
        "compile=True): as above, the per-token quantization fused by torch.compile",
        lambda: plain(int8_dynamic(model, compute_dtype="bfloat16", compile=True)[0]))
    add("leantorch int8 FFN, bf16 attention", "quant.int8_dynamic(compute_dtype='bfloat16', "
        "compile=True, exclude=['*attention*']): int8 GEMMs only in the FFNs (and the pooler); "
        "the attention projections run as bfloat16 matmuls (AMX), which saves their "
        "quantize passes",
        lambda: plain(int8_dynamic(model, compute_dtype="bfloat16", compile=True,
                                   exclude=["*attention*"])[0]))
    for engine in ("x86", "onednn"):
        add(f"torch.ao dynamic ({engine})",
            f"torch.ao.quantization.quantize_dynamic (Linear, qint8), engine {engine}: "
            "per-tensor activations",
            lambda engine=engine: engine_bound(torch_ao_dynamic(model, engine), engine),
            engine=engine)
    add("torchao int8 dyn", "torchao.quantization.quantize_("
        "Int8DynamicActivationInt8WeightConfig())",
        lambda: plain(torchao_quantized(model, "Int8DynamicActivationInt8WeightConfig")))
    torch.backends.quantized.engine = "x86"
    return variants, failed


# --------------------------------------------------------------------------- hardware path
@contextlib.contextmanager
def _stdout_to(path: str):
    """Point file descriptor 1 at ``path`` (oneDNN writes its verbose lines from C)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as handle:
        os.dup2(handle.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def onednn_primitives(run: Callable[[], Any]) -> dict[str, int]:
    """``"kind implementation (src dtype)" -> calls`` of the oneDNN primitives one call of
    ``run`` executes (reorders left out); empty when it calls none (MKL, fbgemm, ATen)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "onednn.txt")
        with _stdout_to(path), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            run()
        with open(path) as handle:
            lines = handle.read().splitlines()
    seen: dict[str, int] = {}
    for line in lines:
        fields = line.split(",")
        if len(fields) < 9 or fields[0] != "onednn_verbose" or "exec" not in fields[1:4]:
            continue
        at = fields.index("exec")
        kind, impl, descs = fields[at + 2], fields[at + 3], fields[at + 5]
        if kind == "reorder":
            continue
        src = descs.split()[0].split(":")[1] if descs.startswith("src:") else "?"
        key = f"{kind} {impl} (src {src})"
        seen[key] = seen.get(key, 0) + 1
    return seen


# --------------------------------------------------------------------------- one shape
def held_out_batches(seq_len: int, which: str = "held_out") -> list[dict[str, torch.Tensor]]:
    """A text set of ``leantorch.data.corpora`` (``"held_out"``: sentences of the bundled set
    no step saw; ``"second"``: the Python reference text, another kind of data) in tokenized
    batches of 32. No variant here is calibrated or fine-tuned, so both are unseen."""
    from leantorch.data import corpora
    from leantorch.models import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    texts = getattr(corpora(0.25), which)
    return [dict(tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=seq_len,
                           return_tensors="pt")) for i in range(0, len(texts), 32)]


def fidelity(variants: dict[str, dict[str, Any]], batches: list[dict[str, torch.Tensor]]
             ) -> dict[str, dict[str, float]]:
    with torch.no_grad():
        outputs = {key: torch.cat([entry["run"](b).float() for b in batches])
                   for key, entry in variants.items()}
    return {key: cosine_stats(out, outputs["fp32"]) for key, out in outputs.items()}


def time_shape(variants: dict[str, dict[str, Any]], batch: int, seq_len: int, warmup: int,
               rounds: int, cpu_rounds: int) -> dict[str, Any]:
    timed, _ = minilm_inputs(batch, seq_len)

    def call(entry: dict[str, Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return entry["run"](timed)
        return run

    fns = {key: call(entry) for key, entry in variants.items()}
    times, spread = repeated_timings(fns, "fp32", warmup, rounds)
    cpu = single_thread_cpu_times(fns, cpu_rounds) if cpu_rounds else {}
    medians = {key: statistics.median(samples) for key, samples in times.items()}
    rows: dict[str, Any] = {}
    for key in variants:
        rows[key] = {
            "median_ms_2_threads": round(medians[key] * 1e3, 2),
            "speedup_vs_fp32": ratio(medians["fp32"], medians[key], 3),
            "speedup_vs_fp32_per_round": spread["per_round"][key],
            "samples_ms": [round(s * 1e3, 2) for s in times[key]],
        }
        if cpu:
            rows[key]["cpu_ms_1_thread"] = round(cpu[key] * 1e3, 2)
            rows[key]["cpu_speedup_vs_fp32_1_thread"] = ratio(cpu["fp32"], cpu[key], 3)
    return {"inputs": {k: list(v.shape) for k, v in timed.items()}, "variants": rows}


def target_check(payload: dict[str, Any], first: dict[str, Any], name: str) -> dict[str, Any]:
    """The issue's target for one int8 variant, computed from the first shape's figures."""
    row = first[name]
    fid = [payload["fidelity_held_out_sentences"][name]["mean"],
           payload["fidelity_second_text_set"][name]["mean"]]
    out: dict[str, Any] = {"cosine_mean_held_out": fid[0], "cosine_mean_second_text_set": fid[1]}
    for key, label in (("speedup_vs_fp32", "2_threads"),
                       ("cpu_speedup_vs_fp32_1_thread", "cpu_1_thread")):
        mine = row.get(key)
        casts = [first[c].get(key) or 0 for c in ("bf16 cast", "plain bf16 cast")]
        out[f"speedup_{label}"] = mine
        out[f"at_least_2.5x_{label}"] = mine is not None and mine >= 2.5
        out[f"faster_than_both_bf16_casts_{label}"] = mine is not None and mine > max(casts)
    out["cosine_at_least_0.99_on_both_sets"] = min(fid) >= 0.99
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    parser.add_argument("--cpu-rounds", type=int, default=3,
                        help="rounds of the 1-thread CPU-time measurement (0: skip it)")
    parser.add_argument("--shapes", nargs="+", default=["32x128", "8x128"],
                        metavar="BATCHxSEQ")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one 4x32 shape, 2 rounds, no CPU-time rounds, "
                        "nothing written")
    options = parser.parse_args(argv)
    if options.quick:
        options.shapes, options.rounds, options.cpu_rounds, options.warmup = \
            ["4x32"], 2, 0, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = setup_threads(THREADS)
    started = time.perf_counter()
    from leantorch.models import load_minilm

    model = load_minilm()
    variants, failed = build_variants(model)
    shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in options.shapes]
    payload: dict[str, Any] = {
        "benchmark": "precision",
        "description": __doc__.split("\n\n")[0],
        "threads": threads,
        "warmup": options.warmup,
        "rounds": options.rounds,
        "cpu_rounds": options.cpu_rounds,
        "machine": machine_info(),
        "torchao": torchao_version(),
        "torchao_location": None if TORCHAO_DIR is None else
        str(TORCHAO_DIR.relative_to(TORCHAO_DIR.parents[1])),
        "load_average_before": list(os.getloadavg()),
        "what": {key: entry["what"] for key, entry in variants.items()},
        "not_run": failed,
    }
    first_inputs, _ = minilm_inputs(*shapes[0])
    payload["onednn_primitives"] = {}
    for key, entry in variants.items():
        with torch.no_grad():
            entry["run"](first_inputs)  # warm: oneDNN packs weights on the first call
            payload["onednn_primitives"][key] = onednn_primitives(
                lambda entry=entry: entry["run"](first_inputs))
    payload["fidelity_held_out_sentences"] = fidelity(variants, held_out_batches(shapes[0][1]))
    payload["fidelity_second_text_set"] = fidelity(
        variants, held_out_batches(shapes[0][1], "second"))
    payload["shapes"] = {}
    for batch, seq_len in shapes:
        name = f"{batch}x{seq_len}"
        payload["shapes"][name] = time_shape(variants, batch, seq_len, options.warmup,
                                             options.rounds, options.cpu_rounds)
        print(f"\nMiniLM {name} ({threads} threads; 1-thread CPU time)")
        for key, row in payload["shapes"][name]["variants"].items():
            cos = payload["fidelity_held_out_sentences"][key]
            cpu = (f"  | CPU {row['cpu_ms_1_thread']:8.1f} ms "
                   f"{row['cpu_speedup_vs_fp32_1_thread']:5.2f}x"
                   if "cpu_ms_1_thread" in row else "")
            print(f"  {key:30s} {row['median_ms_2_threads']:8.1f} ms "
                  f"{row['speedup_vs_fp32']:5.2f}x  cos mean {cos['mean']:.5f} "
                  f"min {cos['min']:.5f}{cpu}")
    for key, why in failed.items():
        print(f"  {key:30s} not run: {why[:120]}")
    first = payload["shapes"][f"{shapes[0][0]}x{shapes[0][1]}"]["variants"]
    payload["targets"] = {name: target_check(payload, first, name) for name in
                          ("leantorch int8 bf16 compiled", "leantorch int8 FFN, bf16 attention")}
    best = "leantorch int8 bf16 compiled"
    payload["target"] = {
        "rule": "on a CPU with AMX: int8 MiniLM >= 2.5x fp32 at mean cosine >= 0.99, and "
                "faster than the bf16 cast (first shape, both timings)",
        "int8": best,
        "speedup_2_threads": first[best]["speedup_vs_fp32"],
        "speedup_cpu_1_thread": first[best].get("cpu_speedup_vs_fp32_1_thread"),
        "bf16_cast_speedup_2_threads": first["bf16 cast"]["speedup_vs_fp32"],
        "bf16_cast_speedup_cpu_1_thread": first["bf16 cast"].get(
            "cpu_speedup_vs_fp32_1_thread"),
        "plain_bf16_cast_speedup_2_threads": first["plain bf16 cast"]["speedup_vs_fp32"],
        "plain_bf16_cast_speedup_cpu_1_thread": first["plain bf16 cast"].get(
            "cpu_speedup_vs_fp32_1_thread"),
        "cosine_mean": payload["fidelity_held_out_sentences"][best]["mean"],
        "cosine_mean_second_text_set": payload["fidelity_second_text_set"][best]["mean"],
    }
    target = payload["target"]
    both = [(target["speedup_2_threads"], "2_threads"), (target["speedup_cpu_1_thread"],
                                                         "cpu_1_thread")]
    target["met"] = {
        "int8_at_least_2.5x": all(v is not None and v >= 2.5 for v, _ in both),
        "cosine_at_least_0.99": min(target["cosine_mean"],
                                    target["cosine_mean_second_text_set"]) >= 0.99,
        "faster_than_every_bf16_cast": all(
            v is not None and v > max(target[f"bf16_cast_speedup_{k}"] or 0,
                                      target[f"plain_bf16_cast_speedup_{k}"] or 0)
            for v, k in both),
    }
    payload["load_average_after"] = list(os.getloadavg())
    payload["script_seconds"] = round(time.perf_counter() - started, 1)
    if options.quick:
        print(f"--quick: nothing written ({payload['script_seconds']} s)")
        return
    path = write_results("precision", payload)
    print(f"wrote {path} in {payload['script_seconds']} s")


if __name__ == "__main__":
    main()
