"""The C row ops (kernels/rows_cpu.c) against torch, and the layers that call them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import rows_cpu
from services.worker.layers.activation import SiluAndMul
from services.worker.layers.layernorm import RMSNorm
from services.worker.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(rows_cpu._library() is None, reason="no C compiler")


@pytest.mark.parametrize(("tokens", "hidden"), [(1, 576), (37, 20), (300, 64)])  # widths with and without a tail
def test_rms_norm_with_and_without_the_residual(tokens, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x, residual, weight = torch.randn(tokens, hidden, generator=gen), torch.randn(tokens, hidden, generator=gen), \
        torch.randn(hidden, generator=gen)
    before = (x.clone(), residual.clone())
    torch.testing.assert_close(rows_cpu.rms_norm(x, weight, 1e-6), F.rms_norm(x, (hidden,), weight, 1e-6))
    normed, summed = rows_cpu.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.rms_norm(x + residual, (hidden,), weight, 1e-6))
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])  # new tensors, inputs untouched


@pytest.mark.parametrize("head_dim", [64, 40])  # halves of 32 (whole vectors) and 20 (a tail)
def test_rotary_in_place_on_a_fused_projections_views(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    heads, kv_heads, tokens = 9, 3, 50
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    cos, sin = rope._cos_sin(positions, torch.float32)
    want_q, want_k, want_v = rope._rotate(q, cos, sin), rope._rotate(k, cos, sin), v.clone()
    with torch.no_grad():  # as the worker runs: the C op only outside autograd
        got_q, got_k = rope(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # rotated where the projection wrote it
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    assert torch.equal(v, want_v)  # the values beside them untouched
    with pytest.raises(ValueError, match="positions outside"):
        rows_cpu.rotary(torch.tensor([512] * tokens), q, head_dim, rope.cos_sin_cache)


def test_silu_and_mul_and_the_layers_take_the_c_ops():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 2 * 1540, generator=gen) * 4  # 1540: a tail past whole vectors; large |x| for exp
    gate, up = x.chunk(2, dim=-1)
    with torch.inference_mode():
        torch.testing.assert_close(SiluAndMul()(x), F.silu(gate) * up)
        norm = RMSNorm(3080)
        torch.testing.assert_close(norm(x), F.rms_norm(x, (3080,), norm.weight, norm.eps))
        assert rows_cpu.usable(x) and not rows_cpu.usable(x.double())
        torch.testing.assert_close(rows_cpu.silu_and_mul(x), F.silu(gate) * up)
    assert not rows_cpu.usable(x)  # autograd keeps torch's ops


def _torch_layers(fn):
    """fn run with the C ops unavailable: the layers' own torch code."""
    rows_cpu._library.cache_clear()
    real = rows_cpu.cpu_build.load_function
    rows_cpu.cpu_build.load_function = lambda *args: None
    try:
        return fn()
    finally:
        rows_cpu.cpu_build.load_function = real
        rows_cpu._library.cache_clear()


def _bf16_mismatch(got: torch.Tensor, want: torch.Tensor) -> float:
    """The share of elements that differ (both bfloat16), none by more than one bfloat16 step."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    step = want.float().abs().clamp(min=1e-30) * 2**-7
    assert bool(((got.float() - want.float()).abs() <= step).all())
    return float((got != want).float().mean())


@pytest.mark.parametrize(("tokens", "width"), [(37, 1540), (5, 20)])  # a tail past whole vectors, and only a tail
def test_bfloat16_rows_round_as_the_layers_torch_code(tokens, width):
    """bfloat16 rows computed in float32 and rounded where torch's bfloat16 ops round: the residual
    add, the rotary's products and sums and the SiLU-and-mul's product exactly; the normed rows and
    SiLU, whose float32 parts differ from torch's in the last bits, within one bfloat16 step of it
    and equal almost everywhere."""
    gen = torch.Generator().manual_seed(width)
    x, residual, gate_up = (torch.randn(tokens, n, generator=gen).bfloat16() * 3 for n in (width, width, 2 * width))
    norm = RMSNorm(width).to(torch.bfloat16)
    norm.weight.copy_(torch.randn(width, generator=gen))
    rope = RotaryEmbedding(width // 2, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    positions = torch.randint(0, 512, (tokens,), generator=gen)

    def layers():
        with torch.inference_mode():
            q, k = x.clone(), residual.clone()
            return norm(x), norm(x, residual), rope(positions, q, k), SiluAndMul()(gate_up)

    with torch.inference_mode():
        assert rows_cpu.usable(x, norm.weight, residual)
    got, want = layers(), _torch_layers(layers)
    with torch.inference_mode():
        assert rows_cpu.usable(x)  # the C ops back
    assert torch.equal(got[1][1], want[1][1])  # x + residual, rounded
    assert torch.equal(got[2][0], want[2][0]) and torch.equal(got[2][1], want[2][1])  # rotary: every rounding
    for g, w in ((got[0], want[0]), (got[1][0], want[1][0]), (got[3], want[3])):
        assert _bf16_mismatch(g, w) < 0.01
