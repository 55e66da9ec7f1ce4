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
