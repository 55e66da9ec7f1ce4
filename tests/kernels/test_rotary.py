"""Neox rotary embedding against its reference and Hugging Face, for default and llama3 caches."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, TOLERANCES

pytest.importorskip("triton")

from kernels.rotary import rope_cos_sin_cache, rope_inv_freq, rotary_embedding, rotary_embedding_ref

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(scaling, dtype):
    num_tokens, num_heads, num_kv_heads, head_dim = 7, 4, 2, 32
    cache = rope_cos_sin_cache(head_dim, 256, base=500000.0, scaling=scaling, device=DEVICE)
    positions = torch.randint(0, 256, (num_tokens,), device=DEVICE)
    q = torch.randn(num_tokens, num_heads * head_dim, device=DEVICE).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads * head_dim, device=DEVICE).to(dtype)
    expected_q, expected_k = rotary_embedding_ref(positions, q, k, cache)
    out_q, out_k = rotary_embedding(positions, q, k, cache, inplace=False)
    torch.testing.assert_close(out_q, expected_q, **TOLERANCES[dtype])
    torch.testing.assert_close(out_k, expected_k, **TOLERANCES[dtype])
    rotary_embedding(positions.int(), q, k, cache)  # in place, int32 positions
    torch.testing.assert_close(q, out_q, atol=0, rtol=0)
    torch.testing.assert_close(k, out_k, atol=0, rtol=0)


def test_in_place_on_fused_qkv_views():
    num_tokens, num_heads, num_kv_heads, head_dim = 5, 2, 1, 16
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cache = rope_cos_sin_cache(head_dim, 32, device=DEVICE)
    positions = torch.arange(num_tokens, device=DEVICE)
    expected_q, expected_k = rotary_embedding_ref(positions, q, k, cache)
    rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(q, expected_q, **TOLERANCES[torch.float32])
    torch.testing.assert_close(k, expected_k, **TOLERANCES[torch.float32])
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


def test_reference_matches_huggingface_rotation():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    num_tokens, num_heads, head_dim = 6, 2, 16
    cache = rope_cos_sin_cache(head_dim, 64, device=DEVICE)
    positions = torch.randint(0, 64, (num_tokens,), device=DEVICE)
    q = torch.randn(num_tokens, num_heads * head_dim, device=DEVICE)
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # HF: [1, T, D]
    hf_q, _ = llama.apply_rotary_pos_emb(
        q.view(1, num_tokens, num_heads, head_dim).transpose(1, 2), q.new_zeros(1, 1, num_tokens, head_dim), cos, sin
    )
    ours, _ = rotary_embedding(positions, q, q.clone(), cache, inplace=False)
    torch.testing.assert_close(ours, hf_q.transpose(1, 2).reshape(num_tokens, -1), **TOLERANCES[torch.float32])


def test_llama3_frequencies_match_huggingface():
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    llama = pytest.importorskip("transformers.models.llama.configuration_llama")
    head_dim, base = 64, 500000.0
    params = {**LLAMA3, "rope_theta": base, "original_max_position_embeddings": 8192, "factor": 32.0}
    try:
        config = llama.LlamaConfig(
            hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=131072,
            rope_parameters=params, rope_scaling=params,
        )
        expected, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    except (TypeError, KeyError, ValueError) as exc:
        pytest.skip(f"this transformers version builds llama3 rope differently: {exc}")
    ours = rope_inv_freq(head_dim, base, params)
    torch.testing.assert_close(ours.float(), expected.float(), atol=0, rtol=1e-5)
    default = rope_inv_freq(head_dim, base)
    assert torch.equal(ours[:4], default[:4])  # short wavelengths are kept
    torch.testing.assert_close(ours[-4:], default[-4:] / 32.0)  # long ones are stretched by factor


def test_rejects_bad_arguments():
    cache = rope_cos_sin_cache(16, 8, device=DEVICE)
    q = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="multiples of head_dim"):
        rotary_embedding(torch.zeros(2, dtype=torch.long, device=DEVICE), q, q[:, :24].contiguous(), cache)
    with pytest.raises(ValueError, match="same number of tokens"):
        rotary_embedding(torch.zeros(3, dtype=torch.long, device=DEVICE), q, q.clone(), cache)
    with pytest.raises(ValueError, match="unsupported rope_type"):
        rope_cos_sin_cache(16, 8, scaling={"rope_type": "yarn"})
