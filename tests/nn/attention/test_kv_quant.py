"""Quantized KV cache: codes within the int8 / int4 bound of the float entries, exact when
the entries are representable, decoding equal to a float cache holding the dequantized entries
(every kind with a KV buffer, every eviction policy), an output error within the bound derived
from the per-element one, per-channel keys clamped past the prompt's range, hand-counted bytes
and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from leantorch.errors import LeanError
from leantorch.nn.attention import (
    HeavyHitters,
    KVBuffer,
    KVCache,
    KVQuant,
    SnapKV,
    StreamingLLM,
    kv_bytes_per_token,
)
from tests.nn.attention._kinds import make, tokens

KV_KINDS = ["exact", "sliding", "topk", "block_sparse", "mla", "based"]
EVICTABLE = ["exact", "topk", "mla"]
POLICIES = {
    "streaming": lambda budget: StreamingLLM(sinks=2, recent=budget - 2),
    "snapkv": lambda budget: SnapKV(budget, window=3, kernel_size=3),
    "heavy": lambda budget: HeavyHitters(budget, recent=2),
}
FORMATS = [("int8", "token"), ("int8", "channel"), ("int4", "token"), ("int4", "channel")]


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n)


def _randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------- storage
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_token_entries_within_half_a_scale(bits: int, dtype) -> None:
    quant = KVQuant(bits=bits)
    buffer = KVBuffer(max_len=None, quant=quant)
    keys, values = _randn(2, 3, 5, 8, seed=1, dtype=dtype), _randn(2, 3, 5, 6, seed=2, dtype=dtype)
    keys[0, 0, 0, 3] = 40.0  # an outlier only widens its own entry's scale
    buffer.append(keys[:, :, :2], values[:, :, :2], _positions(2))
    buffer.append(keys[:, :, 2:], values[:, :, 2:], _positions(5)[2:])
    got_keys, got_values, positions = buffer.view()
    assert got_keys.dtype == dtype and positions[0, 0].tolist() == [0, 1, 2, 3, 4]
    qmax = 2 ** (bits - 1) - 1
    for x, got in ((keys, got_keys), (values, got_values)):
        scale = x.abs().amax(dim=-1, keepdim=True) / qmax  # absmax / 127 (or / 7)
        # float32 scales: a relative 1e-6 of slack for their rounding, nothing more
        assert ((x - got).abs() <= scale / 2 * (1 + 1e-6) + 1e-7 * x.abs()).all()
    assert buffer.keys.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert buffer.keys.shape[-1] == (8 if bits == 8 else 4)  # int4: two codes per byte


@pytest.mark.parametrize("quant,granularity", FORMATS)
def test_representable_entries_come_back_exactly(quant: str, granularity: str) -> None:
    qmax = 127 if quant == "int8" else 7
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(-qmax, qmax + 1, (2, 2, 6, 8), generator=generator).double()
    codes[..., 0] = qmax       # every entry (per token) and ...
    codes[:, :, 0, :] = -qmax  # ... every channel (over the prompt) reaches the extreme code
    keys = codes * 2.0 ** -5   # integers times a power-of-two scale: representable
    values = codes.flip(-1) * 2.0 ** 3
    buffer = KVBuffer(max_len=None, quant=KVQuant.parse("test", quant, granularity))
    buffer.append(keys[:, :, :4], values[:, :, :4], _positions(4))  # the prompt
    buffer.append(keys[:, :, 4:5], values[:, :, 4:5], _positions(1) + 4)
    buffer.append(keys[:, :, 5:], values[:, :, 5:], _positions(1) + 5)
    got_keys, got_values, _ = buffer.view()
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


def test_channel_scale_fixed_by_the_prompt_and_later_keys_clamped() -> None:
    quant = KVQuant(bits=8, granularity="channel")
    buffer = KVBuffer(max_len=None, quant=quant)
    prompt = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    prompt[0, 0, :, 0] = torch.tensor([1.0, -2.54, 0.5])  # channel 0: absmax 2.54
    prompt[0, 0, :, 1] = 100.0                            # an outlier channel keeps its own scale
    values = torch.ones(1, 1, 3, 2, dtype=torch.float64)
    buffer.append(prompt, values, _positions(3))
    scale = buffer.key_channel_scale
    assert scale.shape == (1, 1, 1, 4)
    assert scale[0, 0, 0].tolist() == pytest.approx([2.54 / 127, 100 / 127, 1.0, 1.0], rel=1e-6)
    later = torch.tensor([[[[3.0, 0.3, 0.2, -200.0]]]], dtype=torch.float64)
    buffer.append(later, values[:, :, :1], _positions(1) + 3)
    got = buffer.view()[0][0, 0, 3]
    s = scale[0, 0, 0].double()
    assert got[0] == pytest.approx(127 * float(s[0]))   # 3.0 beyond 2.54: clamped to it
    assert abs(float(got[1]) - 0.3) <= float(s[1]) / 2 * (1 + 1e-6)  # within range: scale / 2
    assert got[2] == pytest.approx(0.0)                  # zero channel (scale 1): 0.2 rounds to 0
    assert got[3] == pytest.approx(-127.0)  # -200 clamped at -127 * 1
    assert torch.equal(buffer.key_channel_scale, scale)  # never recomputed


# --------------------------------------------------------------------------- decoding
class _FakeQuantBuffer(KVBuffer):
    """A float store holding what a quantized one returns (quantize then dequantize at the
    write, with the same scales): the reference for storing codes and moving them."""

    def __init__(self, max_len: int | None, fake: KVQuant) -> None:
        super().__init__(max_len=max_len)
        self.fake = fake
        self.channel_scale: torch.Tensor | None = None

    def _write(self, start, keys, values) -> None:
        fake = self.fake
        if fake.per_channel_keys:
            if self.channel_scale is None:
                self.channel_scale = fake.channel_scale(keys)
            keys_hat = fake.decode(fake.encode_with_scale(keys, self.channel_scale),
                                   self.channel_scale, keys.dtype)
        else:
            keys_hat = fake.decode(*fake.encode_per_token(keys), keys.dtype)
        values_hat = None if values is None else fake.decode(*fake.encode_per_token(values),
                                                             values.dtype)
        super()._write(start, keys_hat, values_hat)

    def view_with_new(self, keys, values):
        all_keys, all_values, positions = (t if t is None else t.clone() for t in self.view())
        all_keys[:, :, -keys.shape[2]:] = keys
        if values is not None:
            all_values[:, :, -keys.shape[2]:] = values
        return all_keys, all_values, positions


class _FakeQuantCache(KVCache):
    def new_buffer(self, bound=None) -> KVBuffer:
        real = super().new_buffer(bound)
        return _FakeQuantBuffer(real.max_len, self.fake)


def _fake_cache(quant: str, granularity: str, **kwargs) -> KVCache:
    cache = _FakeQuantCache(**kwargs)
    cache.fake = KVQuant.parse("test", quant, granularity)
    return cache


def _decode(layer, x: torch.Tensor, cache: KVCache, prompt: int) -> torch.Tensor:
    with torch.no_grad():
        outs = [layer(x[:, :prompt], cache)]
        outs += [layer.step(x[:, t], cache).unsqueeze(1) for t in range(prompt, x.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("quant,granularity", FORMATS)
@pytest.mark.parametrize("kind", KV_KINDS)
def test_quantized_decoding_equals_float_cache_of_dequantized_entries(
        kind: str, quant: str, granularity: str) -> None:
    layer, x = make(kind), tokens(n=13)
    got = _decode(layer, x, KVCache.dynamic(quant=quant, granularity=granularity), 6)
    want = _decode(layer, x, _fake_cache(quant, granularity), 6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and quantization did change something (the comparison is not float against float)
    plain = _decode(layer, x, KVCache.dynamic(), 6)
    assert not torch.allclose(got, plain, rtol=0, atol=1e-9)
    # the prompt attends only to itself: its own keys are used unrounded, as in float
    torch.testing.assert_close(got[:, :6], plain[:, :6], rtol=0, atol=1e-12)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", EVICTABLE)
@pytest.mark.parametrize("quant,granularity", [("int8", "token"), ("int4", "channel")])
def test_eviction_moves_codes_with_their_scales(kind: str, policy: str, static: bool,
                                                quant: str, granularity: str) -> None:
    layer, x = make(kind), tokens(n=20)
    budget, max_len = 6, 32 if static else None
    cache = KVCache(max_len=max_len, policy=POLICIES[policy](budget), quant=quant,
                    granularity=granularity)
    fake = _fake_cache(quant, granularity, max_len=max_len, policy=POLICIES[policy](budget))
    torch.testing.assert_close(_decode(layer, x, cache, 12), _decode(layer, x, fake, 12),
                               rtol=0, atol=1e-12)
    assert torch.equal(cache.positions(), fake.positions())
    assert cache.length() == fake.length()


def test_decoding_error_within_the_bound_from_the_per_element_one() -> None:
    """One exact layer: keys off by ``|dk| <= eps_k`` move each score by at most ``delta =
    softmax_scale * |q|_1 * eps_k``, so the attention weights p' satisfy ``sum |p' - p| <=
    e^(2 delta) - 1`` and each head's output moves by at most ``max|dv| + (e^(2 delta) - 1) *
    max|v|``; the output projection multiplies that by its largest row sum."""
    layer, x = make("exact", num_kv_heads=4), tokens(n=16, seed=5)
    quantized, plain = KVCache.dynamic(quant="int8"), KVCache.dynamic()
    got, want = _decode(layer, x, quantized, 4), _decode(layer, x, plain, 4)
    keys_hat, values_hat, _ = quantized.layer(0).kv.view()
    keys, values, _ = plain.layer(0).kv.view()
    eps_k, eps_v = (keys_hat - keys).abs().max(), (values_hat - values).abs().max()
    assert eps_k <= keys.abs().amax() / 127 / 2 * (1 + 1e-6)  # the per-element int8 bound
    with torch.no_grad():
        q, _, _ = layer._qkv(x, torch.arange(x.shape[1]))
    delta = layer.scale * q.abs().sum(-1).max() * eps_k
    head_bound = eps_v + math.expm1(2 * float(delta)) * values.abs().max()
    bound = head_bound * layer.o_proj.weight.abs().sum(dim=1).max()
    error = (got - want).abs().max()
    assert 0 < error <= bound


# --------------------------------------------------------------------------- residual window
def test_residual_window_keeps_the_most_recent_entries_in_float() -> None:
    quant = KVQuant(bits=4, residual=4)
    buffer = KVBuffer(max_len=None, quant=quant)
    keys, values = _randn(2, 3, 9, 8, seed=4, dtype=torch.float64), _randn(2, 3, 9, 8, seed=5)
    values = values.double()
    buffer.append(keys[:, :, :6], values[:, :, :6], _positions(6))   # a prompt longer than 4
    for t in range(6, 9):
        buffer.append(keys[:, :, t:t + 1], values[:, :, t:t + 1], _positions(1) + t)
    got_keys, got_values, _ = buffer.view()
    assert torch.equal(got_keys[:, :, 5:], keys[:, :, 5:])  # positions 5..8: float copies
    assert torch.equal(got_values[:, :, 5:], values[:, :, 5:])
    scale = keys[:, :, :5].abs().amax(dim=-1, keepdim=True) / 7
    error = (got_keys[:, :, :5] - keys[:, :, :5]).abs()
    assert (error <= scale / 2 * (1 + 1e-6)).all() and (error > 0).any()  # older: int4 codes
    assert (buffer.ring_positions.sort(dim=-1).values == torch.arange(5, 9)).all()


@pytest.mark.parametrize("kind", KV_KINDS)
def test_a_residual_window_covering_everything_is_the_float_cache(kind: str) -> None:
    layer, x = make(kind), tokens(n=11)
    got = _decode(layer, x, KVCache.dynamic(quant="int4", residual=11), 5)
    torch.testing.assert_close(got, _decode(layer, x, KVCache.dynamic(), 5), rtol=0, atol=0)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("policy", POLICIES)
def test_residual_window_under_eviction(policy: str, static: bool) -> None:
    """Kept entries among the ``residual`` newest are the float keys, the others their int8
    codes (within half a scale): slots and codes move with their entries."""
    layer, x = make("exact"), tokens(n=20)
    residual, budget = 3, 6
    cache = KVCache(max_len=32 if static else None, policy=POLICIES[policy](budget),
                    quant="int8", residual=residual)
    out = _decode(layer, x, cache, 12)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        _, k, v = layer._qkv(x, torch.arange(20))
    keys, values, positions = cache.layer(0).kv.view()
    index = positions.unsqueeze(-1).expand(*positions.shape, k.shape[-1])
    want_k, want_v = k.gather(2, index), v.gather(2, index)
    recent = (positions >= 20 - residual).unsqueeze(-1)
    assert int(recent.sum()) >= 2 * 2 * 2  # every policy here keeps the 2 newest tokens
    for got, want in ((keys, want_k), (values, want_v)):
        error = (got - want).abs()
        scale = want.abs().amax(dim=-1, keepdim=True) / 127
        # the reference is projected over the whole sequence, the cache one token at a time:
        # float64 matmuls that differ by rounding (1e-16), nothing more
        assert (error[recent.expand_as(error)] <= 1e-12).all()
        assert (error <= scale / 2 * (1 + 1e-6) + 1e-12).all()
        assert (error[~recent.expand_as(error)] > 1e-6).any()


# --------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_bytes_count_codes_and_scales(static: bool) -> None:
    layer, x = make("exact"), tokens(batch=3, n=7)  # 2 KV heads, head_dim 8
    hand = {  # per token: 2 heads x (key codes + key scale + value codes + value scale)
        ("int8", "token"): 2 * (8 + 4 + 8 + 4),
        ("int4", "token"): 2 * (4 + 4 + 4 + 4),
        ("int8", "channel"): 2 * (8 + 8 + 4),  # key scales: per channel, not per token
        ("int4", "channel"): 2 * (4 + 4 + 4),
    }
    for (quant, granularity), per_token in hand.items():
        fixed = 2 * 8 * 4 if granularity == "channel" else 0  # heads * head_dim float32
        cache = KVCache(max_len=10 if static else None, quant=quant, granularity=granularity)
        layer(x[:, :6], cache)
        layer.step(x[:, 6], cache)
        assert layer.kv_bytes_per_token(quant=cache.kv_quant) == per_token
        assert cache.nbytes() == 3 * (7 * per_token + fixed)
        assert cache.nbytes() == layer.cache_nbytes(7, batch=3, quant=cache.kv_quant)
        if static:
            assert cache.allocated_nbytes() == 3 * (10 * per_token + fixed)
    # a residual window of 4 adds 4 float64 entries: 2 heads x (8 + 8) x 8 bytes each
    cache = KVCache(max_len=10 if static else None, quant="int8", residual=4)
    layer(x[:, :6], cache)
    layer.step(x[:, 6], cache)
    assert cache.nbytes() == 3 * (7 * 48 + 4 * 256)
    assert cache.nbytes() == layer.cache_nbytes(7, batch=3, dtype=torch.float64,
                                                quant=cache.kv_quant)
    if static:
        assert cache.allocated_nbytes() == 3 * (10 * 48 + 4 * 256)
    float_bytes = KVCache.dynamic()
    layer(x, float_bytes)
    assert float_bytes.nbytes() == 3 * 7 * 2 * 2 * 8 * 8  # float64 keys and values


def test_bytes_of_latent_and_window_caches() -> None:
    mla, x = make("mla", kv_lora_rank=12, rope_dim=4), tokens(batch=2, n=9)
    cache = KVCache.dynamic(quant="int8")
    mla(x, cache)
    # one shared row of 12 + 4 codes and its scale, no values
    assert mla.kv_bytes_per_token(quant=cache.kv_quant) == 16 + 4
    assert kv_bytes_per_token(latent_dim=12, rope_dim=4, quant=cache.kv_quant) == 20
    assert cache.nbytes() == 2 * 9 * 20 == mla.cache_nbytes(9, batch=2, quant=cache.kv_quant)
    based = make("based")  # window 4: 3 entries of the window heads, plus the linear state
    cache = KVCache.dynamic(quant="int8", granularity="channel")
    based(x, cache)
    heads = based.num_kv_heads - based.linear_kv_heads
    expected = 2 * (3 * heads * (8 + 8 + 4) + heads * 8 * 4) + based.state_nbytes(2, torch.float64)
    assert cache.nbytes() == expected
    assert cache.nbytes() == based.cache_nbytes(9, batch=2, dtype=torch.float64,
                                                quant=cache.kv_quant)


# --------------------------------------------------------------------------- errors
def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(LeanError, match=r"quant='int2'.*'int8', 'int4'"):
        KVCache.dynamic(quant="int2")
    with pytest.raises(LeanError, match=r"granularity='head'.*'token', 'channel'"):
        KVCache.static(8, quant="int8", granularity="head")
    with pytest.raises(LeanError, match=r"quant=8"):
        KVCache(quant=8)
    with pytest.raises(LeanError, match=r"residual=4 with quant=None"):
        KVCache.dynamic(residual=4)
    with pytest.raises(LeanError, match=r"residual=-1.*>= 0"):
        KVCache.dynamic(quant="int8", residual=-1)
    buffer = KVBuffer(max_len=None, quant=KVQuant(bits=4))
    with pytest.raises(LeanError, match=r"int4.*3 features"):
        buffer.append(torch.ones(1, 1, 2, 3), None, _positions(2))
