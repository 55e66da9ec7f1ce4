"""When a Llama-family model's decode step runs as one C call (kernels/decode_step_cpu.py).

The model qualifies once: float32 or bfloat16 on the CPU, one tensor- and pipeline-parallel rank,
RMSNorm, plain rotary q/k (no per-head norms), a SiLU-gated MLP, projections in the model's dtype
or int8 weight-only (W8A16), no LoRA, dimensions the linear kernels take. A step qualifies when
the torch backend's C attention kernel reads it whole (decodes, speculative verification, chunks
of a few tokens; a cache of the model's dtype or fp8), at most f32_linear_cpu.MAX_ROWS tokens in
all. A bfloat16 model's step computes in float32 over its bfloat16 weights and cache (norm
weights, biases and the rotary table as float32 copies), so it rounds less than the layers do.
Every other model and step runs the layers' own torch forward, which this must equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from kernels import cpu_build, decode_step_cpu, f32_linear_cpu, paged_decode_cpu
from services.worker.forward_context import get_forward_context
from services.worker.layers.activation import SiluAndMul
from services.worker.layers.layernorm import RMSNorm
from services.worker.quant.int8 import Int8Weights

if TYPE_CHECKING:
    from services.worker.models.llama import LlamaModel


class _Weight(NamedTuple):
    weight: torch.Tensor  # the model's dtype, or int8 with scale
    scale: torch.Tensor | None


def _weight(lin, dtype: torch.dtype) -> _Weight | None:
    """A projection's weight as the C step takes it: in the model's dtype, or int8 weight-only
    (W8A16, not with quantized activations); None for any other kind."""
    if lin.quant is None:
        return _Weight(lin.weight, None) if lin.weight.dtype == dtype and lin.weight.is_contiguous() else None
    if type(lin.quant) is Int8Weights and lin.quant.weight.dtype == torch.int8 and lin.quant.weight.is_contiguous():
        return _Weight(lin.quant.weight, lin.quant.scale)
    return None


def _layers(model: LlamaModel) -> decode_step_cpu.DecodeLayers | None:
    """The model's layers for the C step, or None when the model does not qualify."""
    from services.worker.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

    if not (model.first and model.last and decode_step_cpu.available()):
        return None
    dtype = model.embed_tokens.weight.dtype
    if dtype not in f32_linear_cpu.DTYPES:
        return None
    params, attn = [], None
    for layer in model.layers:
        if type(layer) is not LlamaDecoderLayer or not isinstance(layer.mlp, LlamaMLP):
            return None
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if (type(attn).norm_qk is not LlamaAttention.norm_qk or type(mlp.act_fn) is not SiluAndMul
                or any(type(n) is not RMSNorm or n.eps != norms[0].eps for n in norms)
                or any(lin.lora is not None or lin.tp_size != 1 for lin in linears)):
            return None
        weights = [_weight(lin, dtype) for lin in linears]
        if any(w is None for w in weights):
            return None
        biases = [lin.bias for lin in linears]
        tensors = [n.weight for n in norms] + [t for t in biases if t is not None] + [w.weight for w in weights]
        scales = [w.scale for w in weights if w.scale is not None]
        if (any(t.device.type != "cpu" for t in tensors + scales) or any(w.weight.shape[1] % 8 for w in weights)
                or any(t.dtype != torch.float32 or not t.is_contiguous() for t in scales)):
            return None
        (qkv, o, gate_up, down), (qkv_b, o_b, gate_up_b, down_b) = weights, (_f32(b) for b in biases)
        params.append(decode_step_cpu.LayerParams(
            _f32(norms[0].weight), _f32(norms[1].weight), qkv.weight, qkv_b, o.weight, o_b, gate_up.weight, gate_up_b,
            down.weight, down_b, qkv.scale, o.scale, gate_up.scale, down.scale))
    if attn is None:
        return None
    rotary = model.rotary_emb
    heads, kv_heads = attn.qkv_proj.num_heads, attn.qkv_proj.num_kv_heads
    return decode_step_cpu.DecodeLayers(params, heads, kv_heads, attn.attn.head_dim, model.layers[0].input_layernorm.eps,
                                        attn.attn.scale, _f32(rotary.cos_sin_cache))


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a contiguous float32 tensor (itself when it is one already)."""
    return None if t is None else t.to(torch.float32).contiguous()


def run(model: LlamaModel, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(hidden, residual) after every layer through the C step, or None when this model or step
    does not qualify (the caller then runs the layers); model.aux_hidden as the layers set it."""
    layers = getattr(model, "_decode_layers", False)
    if layers is False:
        layers = model._decode_layers = _layers(model)
    if layers is None or torch.is_grad_enabled() or hidden.dim() != 2:
        return None
    ctx = get_forward_context()
    meta, tokens = ctx.attn_metadata, hidden.shape[0]
    groups = getattr(meta, "groups", None)
    if (ctx.lora is not None or not groups or len(groups) != 1 or groups[0].seq_lens is None
            or tokens > f32_linear_cpu.MAX_ROWS or len(groups[0].seq_lens) != tokens):
        return None
    caches = [ctx.kv_caches[i] for i in range(len(model.layers))]
    if caches[0].dtype not in paged_decode_cpu.FORMATS or any(c.dtype != caches[0].dtype for c in caches):
        return None
    fp8 = caches[0].dtype in paged_decode_cpu.FP8_DTYPES
    attns = [layer.self_attn.attn for layer in model.layers]
    kv_scales = [(a.k_scale, a.v_scale) if fp8 else (1.0, 1.0) for a in attns]  # measured after load
    group, slots = groups[0], meta.slot_mapping
    table, rows = group.block_table.contiguous(), group.table_rows
    rows = None if rows is None else rows.contiguous()
    _check(positions, slots, table, rows, group.seq_lens, caches[0], len(layers.cos_sin))
    aux = {i: torch.empty(hidden.shape) for i in model.aux_layers}  # the states an EAGLE-3 head reads (float32)
    out = layers.run(hidden, positions.contiguous(), slots.contiguous(), table, rows, group.seq_lens.contiguous(),
                     caches, kv_scales, cpu_build.threads(), aux)
    model.aux_hidden = [aux[i].to(hidden.dtype) for i in model.aux_layers]
    return out


def _check(positions: torch.Tensor, slots: torch.Tensor, table: torch.Tensor, rows: torch.Tensor | None,
           seq_lens: torch.Tensor, cache: torch.Tensor, max_position: int) -> None:
    """What the C step reads and writes unchecked, checked once per step: a bad index would reach
    outside the caches or the rotary table."""
    num_blocks, block_size = cache.shape[1], cache.shape[2]
    if not (positions.dtype == slots.dtype == table.dtype == seq_lens.dtype == torch.int64):
        raise ValueError("decode step indices must be int64")
    if int(positions.min()) < 0 or int(positions.max()) >= max_position:
        raise IndexError(f"positions outside [0, {max_position})")
    if int(slots.max()) >= num_blocks * block_size or int(table.min()) < 0 or int(table.max()) >= num_blocks:
        raise IndexError("a slot or block id lies outside the KV cache")
    if rows is None and table.shape[0] != len(seq_lens):
        raise IndexError("one block table row per token is needed")
    if rows is not None and (rows.dtype != torch.int64 or int(rows.min()) < 0 or int(rows.max()) >= table.shape[0]):
        raise IndexError("a token's table row lies outside the block table")
    if int(seq_lens.max()) > table.shape[1] * block_size:
        raise IndexError("a context is longer than its block table")
