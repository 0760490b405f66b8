"""Fidelity and bytes of quantized KV caches on a small leantorch language model.

leantorch ships no language model built from its own ``Attention`` (``leantorch.models`` adapts
transformers models, whose attention does not use ``KVCache``), so this script assembles one:
a byte-level GPT-style decoder (embedding, 2 pre-norm blocks of ``Attention(kind="exact")``
with GQA 4/2 heads of 32 and RoPE, a GELU MLP, tied output head), trained from random weights
for a few hundred steps on ``leantorch.data.corpora().calibration`` (English sentences), so its
attention is not random. Then, for two kinds of prompt,

* ``held_out``: held-out sentences of the training kind;
* ``second``: ``corpora().second``, technical prose (a different kind of text),

each prompt (``PROMPT`` bytes) is prefilled and ``DECODE`` tokens are decoded greedily with a
float cache; every quantized cache is fed the same tokens (teacher forcing), so the logits of
each step can be compared position by position with the float cache's: max and mean absolute
logit difference, top-1 (greedy token) agreement, and the cache bytes (``KVCache.nbytes()``,
codes + scales + residual window, all layers, checked against ``Attention.cache_nbytes``).

Writes ``benchmarks/results/kv_quant.json`` (with the machine block). Under 3 minutes on 2
threads. Run from the repository root: ``python benchmarks/kv_quant.py`` (``--quick``: fewer
steps and prompts, prints only).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _common import THREADS, machine_info, setup_threads, write_results
from leantorch.data import corpora
from leantorch.nn.attention import Attention, KVCache

VOCAB, DIM, LAYERS, HEADS, KV_HEADS = 256, 128, 2, 4, 2
PROMPT, DECODE, SEQ = 64, 64, 64
VARIANTS: dict[str, dict[str, Any]] = {
    "float": {},
    "int8_token": {"quant": "int8"},
    "int8_channel": {"quant": "int8", "granularity": "channel"},
    "int4_token": {"quant": "int4"},
    "int4_channel": {"quant": "int4", "granularity": "channel"},
    "int4_token_residual16": {"quant": "int4", "residual": 16},
    "int8_token_residual16": {"quant": "int8", "residual": 16},
}


class Block(nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = Attention(DIM, HEADS, KV_HEADS, "exact", layer_idx=layer_idx)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Byte-level decoder: ids (batch, seq) -> logits (batch, seq, 256)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(i) for i in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied head: small logits at the start

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cache)
        return self.norm(x) @ self.embed.weight.t()


def encode(texts: list[str]) -> torch.Tensor:
    """All texts, newline-joined, as one byte tensor."""
    return torch.tensor(list("\n".join(texts).encode("utf-8")), dtype=torch.long)


def train(model: TinyLM, data: torch.Tensor, steps: int, batch: int = 16) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # cosine decay
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def decode_logits(model: TinyLM, prompt: torch.Tensor, tokens: torch.Tensor | None,
                  cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``prompt (1, P)`` then decode DECODE tokens: greedy when ``tokens`` is None,
    else fed ``tokens (DECODE,)`` (teacher forcing). -> (logits (DECODE, vocab) predicting
    each decoded token, the tokens fed)."""
    logits = model(prompt, cache)[:, -1]
    fed, out = [], []
    for t in range(DECODE):
        out.append(logits[0])
        token = logits.argmax(-1) if tokens is None else tokens[t].view(1)
        fed.append(token)
        logits = model(token.view(1, 1), cache)[:, -1]
    return torch.stack(out), torch.cat(fed)


def prompts_of(texts: list[str], count: int, seed: int) -> list[torch.Tensor]:
    data = encode(texts)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - PROMPT, (count,), generator=generator)
    return [data[s:s + PROMPT].view(1, -1) for s in starts.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run that writes nothing")
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per kind of data")
    args = parser.parse_args()
    threads = setup_threads(THREADS)
    steps, count = (30, 2) if args.quick else (args.steps, args.prompts)
    torch.manual_seed(0)
    started = time.perf_counter()
    texts = corpora()
    model = TinyLM()
    losses = train(model, encode(texts.calibration), steps)
    print(f"trained {steps} steps: loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.2f} "
          f"({time.perf_counter() - started:.0f} s)")
    layer = model.blocks[0].attn
    results: dict[str, Any] = {}
    for kind, kind_texts in (("held_out", texts.held_out), ("second", texts.second)):
        rows: dict[str, dict[str, Any]] = {name: {"max_abs_logit_diff": 0.0, "sum_abs": 0.0,
                                                  "agree": 0, "steps": 0}
                                           for name in VARIANTS}
        spread = []  # the float logits' standard deviation per step: the scale of a difference
        for i, prompt in enumerate(prompts_of(kind_texts, count, seed=1 + len(kind))):
            reference, tokens = decode_logits(model, prompt, None, KVCache.dynamic())
            spread.append(float(reference.std(dim=-1).mean()))
            for name, options in VARIANTS.items():
                cache = KVCache.dynamic(**options)
                logits, _ = decode_logits(model, prompt, tokens, cache)
                diff = (logits - reference).abs()
                row = rows[name]
                row["max_abs_logit_diff"] = max(row["max_abs_logit_diff"], float(diff.max()))
                row["sum_abs"] += float(diff.mean()) * DECODE
                row["agree"] += int((logits.argmax(-1) == reference.argmax(-1)).sum())
                row["steps"] += DECODE
                context = PROMPT + DECODE  # the last decoded token is fed but not scored
                expected = LAYERS * layer.cache_nbytes(context, quant=cache.kv_quant)
                if cache.nbytes() != expected:
                    raise AssertionError(f"{name}: cache.nbytes()={cache.nbytes()} but "
                                         f"cache_nbytes gives {expected}")
                row["cache_bytes"] = cache.nbytes()
                if i == 0 and name == "float":
                    row["sample"] = bytes(tokens.tolist()).decode("utf-8", "replace")
        float_bytes = rows["float"]["cache_bytes"]
        for row in rows.values():
            row["mean_abs_logit_diff"] = row.pop("sum_abs") / row["steps"]
            row["top1_agreement"] = row.pop("agree") / row["steps"]
            row["bytes_vs_float"] = row["cache_bytes"] / float_bytes
        results[kind] = {"float_logit_std": sum(spread) / len(spread), "caches": rows}
        print(f"\n{kind} ({count} prompts x {DECODE} decoded tokens, context "
              f"{PROMPT + DECODE}; float logits' std {sum(spread) / len(spread):.2f}):")
        print(f"  {'cache':24s} {'bytes':>8s} {'x float':>8s} {'max|dlogit|':>12s} "
              f"{'mean|dlogit|':>13s} {'top-1 agree':>12s}")
        for name, row in rows.items():
            print(f"  {name:24s} {row['cache_bytes']:8d} {row['bytes_vs_float']:8.3f} "
                  f"{row['max_abs_logit_diff']:12.4f} {row['mean_abs_logit_diff']:13.5f} "
                  f"{row['top1_agreement']:12.4f}")
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s, {threads} threads")
    if args.quick:
        return
    payload = {
        "benchmark": "kv_quant",
        "model": {"kind": "byte-level GPT-style decoder built from leantorch Attention",
                  "layers": LAYERS, "dim": DIM, "heads": HEADS, "kv_heads": KV_HEADS,
                  "head_dim": DIM // HEADS, "params": sum(p.numel() for p in model.parameters()),
                  "train_steps": steps, "train_data": "leantorch.data.corpora().calibration",
                  "loss_first": losses[0], "loss_last20_mean": sum(losses[-20:]) / 20},
        "prompt_len": PROMPT, "decode_tokens": DECODE, "prompts_per_kind": count,
        "comparison": "teacher-forced on the float cache's greedy tokens; logits of each "
                      "decoded step vs the float cache's",
        "variants": VARIANTS,
        "results": results,
        "seconds": elapsed,
        "machine": machine_info(),
    }
    print(write_results("kv_quant", payload))


if __name__ == "__main__":
    main()
