"""Per-token decode latency of ``leantorch.nn.attention.Attention`` against context length.

Batch 1, dim 512, 8 query heads of 64, fp32, 2 threads. For each context length L (512 ... 8192)
every variant gets its own cache prefilled with L tokens (in chunks of 512), then one-token
``step()`` calls of all variants are timed interleaved (after warm-up; each timed step appends its
token, so the context grows by at most ``warmup + rounds`` tokens during a measurement):

* ``exact``: MHA with a growing KV cache (cost per token O(L));
* ``exact_gqa2``: GQA with 2 KV heads (a 4x smaller cache, same attention FLOPs);
* ``exact_streaming``: exact with ``StreamingLLM(sinks=4, recent=508)`` (cache flat at 512);
* ``exact_h2o``: exact with ``HeavyHitters(budget=512)`` (flat, plus the vote computation);
* ``sliding``: window 512 (flat);
* ``linear``, ``gla``: recurrent state (flat);
* ``mla_absorbed`` / ``mla_unabsorbed``: MLA with kv_lora_rank 256 and rope_dim 32, decoding in
  latent space vs rebuilding K and V from the whole latent cache every step;
* ``hf_llama`` (the peer): transformers' ``LlamaAttention`` (SDPA) with a ``DynamicCache``,
  carrying the same weights as ``exact`` (its outputs are checked against ours first).

Ratios: each variant's median over ``exact``'s at the same L, and each variant's median at L over
its own at the smallest L (flat = about 1). Writes ``benchmarks/results/attention_decode.json``.

Run from the repository root:
``flock /tmp/leantorch-bench.lock .venv/bin/python benchmarks/attention_decode.py``
(``--quick``: a short smoke run that prints and writes nothing).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from _common import (
    THREADS,
    error_text,
    interleaved_timings,
    machine_info,
    ratio,
    setup_threads,
    summarize,
    write_results,
)
from leantorch.nn.attention import Attention, HeavyHitters, KVCache, StreamingLLM

DIM, HEADS, HEAD_DIM = 512, 8, 64
BUDGET = 512
PREFILL_CHUNK = 512


def build_layers() -> dict[str, tuple[Attention, Callable[[], KVCache], dict[str, Any]]]:
    """name -> (layer, cache factory, step kwargs)."""
    torch.manual_seed(0)
    exact = Attention(DIM, HEADS).eval()
    mla = Attention(DIM, HEADS, kind="mla", kv_lora_rank=256, rope_dim=32).eval()
    return {
        "exact": (exact, KVCache.dynamic, {}),
        "exact_gqa2": (Attention(DIM, HEADS, 2).eval(), KVCache.dynamic, {}),
        "exact_streaming": (exact, lambda: KVCache.dynamic(StreamingLLM(4, BUDGET - 4)), {}),
        "exact_h2o": (exact, lambda: KVCache.dynamic(HeavyHitters(BUDGET)), {}),
        "sliding": (Attention(DIM, HEADS, kind="sliding", window=BUDGET).eval(),
                    KVCache.dynamic, {}),
        "linear": (Attention(DIM, HEADS, kind="linear").eval(), KVCache.dynamic, {}),
        "gla": (Attention(DIM, HEADS, kind="gla").eval(), KVCache.dynamic, {}),
        "mla_absorbed": (mla, KVCache.dynamic, {"absorb": True}),
        "mla_unabsorbed": (mla, KVCache.dynamic, {"absorb": False}),
    }


class HFLlamaPeer:
    """transformers' LlamaAttention with our exact layer's weights, decoding with DynamicCache."""

    def __init__(self, exact: Attention) -> None:
        from transformers import LlamaConfig
        from transformers.cache_utils import DynamicCache
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

        config = LlamaConfig(hidden_size=DIM, num_attention_heads=HEADS,
                             num_key_value_heads=HEADS, head_dim=HEAD_DIM,
                             rope_theta=exact.rope_base, attention_bias=False,
                             max_position_embeddings=65536)
        config._attn_implementation = "sdpa"
        self.attention = LlamaAttention(config, layer_idx=0).eval()
        self.attention.load_state_dict(
            {k: v for k, v in exact.state_dict().items() if k.endswith("proj.weight")})
        self.rotary = LlamaRotaryEmbedding(config)
        self.cache_type = DynamicCache
        self.config = config
        self.cache = DynamicCache(config=config)
        self.seen = 0

    def reset(self) -> None:
        self.cache = self.cache_type(config=self.config)
        self.seen = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        position_ids = torch.arange(self.seen, self.seen + n).unsqueeze(0)
        cos_sin = self.rotary(x, position_ids)
        mask = None
        if n > 1:  # bottom-right causal over cached + new keys
            total = self.seen + n
            i = torch.arange(n)[:, None] + self.seen
            mask = torch.arange(total)[None, :] <= i
            mask = mask[None, None]
        out, _ = self.attention(x, cos_sin, mask, past_key_values=self.cache)
        self.seen += n
        return out


def prefill(layer: Attention, cache: KVCache, tokens: torch.Tensor) -> None:
    for start in range(0, tokens.shape[1], PREFILL_CHUNK):
        layer(tokens[:, start:start + PREFILL_CHUNK], cache)


def check_peer(exact: Attention, peer: HFLlamaPeer) -> float:
    """Max |ours - peer| over a 96-token prefill (in chunks of 32) and 8 decoding steps."""
    x = torch.randn(1, 104, DIM)
    cache = KVCache.dynamic()
    peer.reset()
    diff = 0.0
    for start in range(0, 96, 32):
        chunk = x[:, start:start + 32]
        diff = max(diff, (exact(chunk, cache) - peer(chunk)).abs().max().item())
    for t in range(96, 104):
        step = x[:, t:t + 1]
        diff = max(diff, (exact(step, cache) - peer(step)).abs().max().item())
    peer.reset()
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args()
    setup_threads(THREADS)
    contexts = [256, 512] if args.quick else [512, 1024, 2048, 4096, 8192]
    warmup, rounds = (2, 5) if args.quick else (3, 25)
    torch.set_grad_enabled(False)
    layers = build_layers()
    peer, peer_error, peer_max_abs_diff = None, None, None
    try:
        peer = HFLlamaPeer(layers["exact"][0])
        peer_max_abs_diff = check_peer(layers["exact"][0], peer)
    except Exception as error:  # the peer is optional; record why it is missing
        peer, peer_error = None, error_text(error)

    started = time.time()
    per_context: list[dict[str, Any]] = []
    for context in contexts:
        generator = torch.Generator().manual_seed(context)
        tokens = torch.randn(1, context + warmup + rounds + 1, DIM, generator=generator)
        prompt, stream = tokens[:, :context], tokens[:, context:]
        fns: dict[str, Callable[[], Any]] = {}
        cache_bytes: dict[str, int] = {}
        for name, (layer, make_cache, step_kwargs) in layers.items():
            cache = make_cache()
            prefill(layer, cache, prompt)
            cache_bytes[name] = cache.nbytes()
            position = iter(range(stream.shape[1]))

            def step(layer=layer, cache=cache, step_kwargs=step_kwargs, position=position,
                     stream=stream):
                layer.step(stream[:, next(position)], cache, **step_kwargs)

            fns[name] = step
        if peer is not None:
            peer.reset()
            for start in range(0, context, PREFILL_CHUNK):
                peer(prompt[:, start:start + PREFILL_CHUNK])
            peer_position = iter(range(stream.shape[1]))

            def peer_step(position=peer_position, stream=stream):
                peer(stream[:, next(position)].unsqueeze(1))

            fns["hf_llama"] = peer_step
            cache_bytes["hf_llama"] = sum(
                t.numel() * t.element_size() for layer in peer.cache.layers
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if t is not None)
        times = interleaved_timings(fns, warmup=warmup, rounds=rounds)
        stats = {name: summarize(samples) for name, samples in times.items()}
        base = stats["exact"]["median_s"]
        per_context.append({
            "context": context,
            "median_ms": {name: round(s["median_s"] * 1e3, 4) for name, s in stats.items()},
            "ratio_to_exact": {name: ratio(s["median_s"], base) for name, s in stats.items()},
            "cache_bytes_after_prefill": cache_bytes,
            "timings": stats,
        })
        print(f"L={context:5d} " + "  ".join(
            f"{name}={s['median_s'] * 1e3:.3f}ms" for name, s in stats.items()), flush=True)

    first = per_context[0]["median_ms"]
    growth = {name: {str(entry["context"]): ratio(entry["median_ms"][name], first[name])
                     for entry in per_context} for name in first}
    last = per_context[-1]
    payload = {
        "benchmark": "attention_decode",
        "description": "per-token decode latency (one Attention.step) vs context length, "
                       "batch 1, dim 512, 8 heads x 64, fp32",
        "threads": THREADS,
        "load_average_before": None,
        "shapes": {"dim": DIM, "num_heads": HEADS, "head_dim": HEAD_DIM, "batch": 1,
                   "budget": BUDGET, "mla_kv_lora_rank": 256, "mla_rope_dim": 32,
                   "prefill_chunk": PREFILL_CHUNK},
        "contexts": contexts,
        "warmup": warmup,
        "rounds": rounds,
        "peer": "transformers LlamaAttention (sdpa) + DynamicCache" if peer else None,
        "peer_error": peer_error,
        "peer_max_abs_diff_vs_exact": peer_max_abs_diff,
        "results": per_context,
        "growth_vs_smallest_context": growth,
        "summary": {
            "context": last["context"],
            "exact_ms": last["median_ms"]["exact"],
            "ratio_to_exact": last["ratio_to_exact"],
            "exact_growth": growth["exact"][str(last["context"])],
            "streaming_growth": growth["exact_streaming"][str(last["context"])],
            "h2o_growth": growth["exact_h2o"][str(last["context"])],
            "linear_growth": growth["linear"][str(last["context"])],
            "gla_growth": growth["gla"][str(last["context"])],
            "mla_unabsorbed_over_absorbed": ratio(last["median_ms"]["mla_unabsorbed"],
                                                  last["median_ms"]["mla_absorbed"]),
            "exact_over_hf_llama": ratio(last["median_ms"]["exact"],
                                         last["median_ms"].get("hf_llama")),
        },
        "elapsed_s": round(time.time() - started, 1),
        "machine": machine_info(),
    }
    payload["load_average_before"] = LOAD_BEFORE
    payload["load_average_after"] = list(os.getloadavg())
    if args.quick:  # a smoke run: print, never overwrite the real results
        print({key: payload[key] for key in ("summary", "peer_max_abs_diff_vs_exact")})
        return
    path = write_results("attention_decode", payload)
    print(f"wrote {path}")


LOAD_BEFORE = list(os.getloadavg())

if __name__ == "__main__":
    main()
