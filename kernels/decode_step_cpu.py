"""One float32 CPU decode step through every decoder layer of a Llama-family model in one C call
(decode_step_cpu.c); services/worker/models/llama_decode_cpu.py decides when a step takes it.

`DecodeLayers` holds the layers' parameter pointers (and the tensors, so they stay alive) and runs
a step: the embeddings in, (hidden, residual) out, as the model's layer loop returns them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from kernels import cpu_build, paged_decode_cpu

SOURCE = Path(__file__).with_name("decode_step_cpu.c")


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "post_norm", "qkv_w", "qkv_b", "o_w", "o_b", "gate_up_w", "gate_up_b", "down_w", "down_b",
        "k_cache", "v_cache", "qkv_s", "o_s", "gate_up_s", "down_s")] + [
        ("k_scale", ctypes.c_float), ("v_scale", ctypes.c_float), ("aux", ctypes.c_void_p)]


class _Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in (
        "hidden", "heads", "kv_heads", "head_dim", "inter", "block_size", "table_width")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("kv_fmt", ctypes.c_int64), ("w_fmt", ctypes.c_int64)]


@cache
def _library() -> ctypes.CDLL | None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    argtypes = [ptr, i64, ptr, ptr, i64] + [ptr] * 8 + [i64]
    return cpu_build.load_function(SOURCE, "CPU decode step kernel", "decode_layers", argtypes)


def available() -> bool:
    return _library() is not None


@dataclass
class LayerParams:
    """One decoder layer's CPU tensors, contiguous: float32, except projection weights, which are
    float32 or bfloat16 (all of one dtype), or int8 with their float32 per-row scales (_s; None for
    the others). Biases may be None."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    qkv_s: torch.Tensor | None = None
    o_s: torch.Tensor | None = None
    gate_up_s: torch.Tensor | None = None
    down_s: torch.Tensor | None = None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeLayers:
    """The layers of one model, with their shapes; run() takes one step's inputs."""

    def __init__(self, layers: list[LayerParams], heads: int, kv_heads: int, head_dim: int, eps: float,
                 scale: float, cos_sin: torch.Tensor):
        self.params, self.cos_sin = layers, cos_sin
        weights = {w.dtype for p in layers for w in (p.qkv_w, p.o_w, p.gate_up_w, p.down_w)} - {torch.int8}
        assert len(weights) <= 1 and weights <= {torch.float32, torch.bfloat16}
        self.w_fmt = paged_decode_cpu.FORMATS[weights.pop() if weights else torch.float32]  # widen.h's codes
        self.hidden, self.inter = layers[0].qkv_w.shape[1], layers[0].down_w.shape[1]
        self.heads, self.kv_heads, self.head_dim, self.eps, self.scale = heads, kv_heads, head_dim, eps, scale
        self.table = (_Layer * len(layers))()
        for entry, p in zip(self.table, layers):
            for name in LayerParams.__dataclass_fields__:
                setattr(entry, name, _ptr(getattr(p, name)))
        self.caches: list[torch.Tensor] | None = None
        self.kv_scales: list[tuple[float, float]] | None = None
        self.aux_bound = False  # some layer's aux pointer is set

    def _bind(self, kv_caches: list[torch.Tensor], kv_scales: list[tuple[float, float]]) -> None:
        """Point each layer at its cache and its scales (again when either changed)."""
        if self.caches is None or any(a is not b for a, b in zip(self.caches, kv_caches)):
            for entry, cache_ in zip(self.table, kv_caches):
                entry.k_cache, entry.v_cache = cache_[0].data_ptr(), cache_[1].data_ptr()
            self.caches = list(kv_caches)
        if kv_scales != self.kv_scales:
            for entry, (k_scale, v_scale) in zip(self.table, kv_scales):
                entry.k_scale, entry.v_scale = k_scale, v_scale
            self.kv_scales = list(kv_scales)

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
            table_rows: torch.Tensor | None, seq_lens: torch.Tensor, kv_caches: list[torch.Tensor],
            kv_scales: list[tuple[float, float]], threads: int,
            aux: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] (the embeddings) -> (hidden, residual) after the last layer, computed in
        float32 and returned in hidden's dtype (float32 or bfloat16). Token t attends
        to seq_lens[t] tokens of table row table_rows[t] (t without table_rows). kv_caches: all
        float32, all bfloat16 or all one fp8 dtype, with each layer's (k_scale, v_scale) (fp8's). The
        caller has checked the inputs against the caches (llama_decode_cpu.py): positions inside
        cos_sin, slots and block ids inside the cache, table rows inside the table, seq_lens within it.
        aux: layer -> a [T, H] float32 tensor that receives the residual stream entering that layer."""
        self._bind(kv_caches, kv_scales)
        if aux or self.aux_bound:  # the layers asked for point at their outputs, the others at none
            for i, entry in enumerate(self.table):
                entry.aux = _ptr(aux.get(i)) if aux else None
            self.aux_bound = bool(aux)
        tokens = hidden.shape[0]
        block_size = kv_caches[0].shape[2]
        shape = _Shape(self.hidden, self.heads, self.kv_heads, self.head_dim, self.inter, block_size, tables.shape[1],
                       self.eps, self.scale, paged_decode_cpu.FORMATS[kv_caches[0].dtype], self.w_fmt)
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        scratch = torch.empty(tokens * (self.hidden + qkv + 2 * self.heads * self.head_dim + 3 * self.inter))
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32, copy=True).contiguous()
        residual = torch.empty_like(hidden)
        _library().decode_layers(self.table, len(self.params), ctypes.byref(shape), self.cos_sin.data_ptr(), tokens,
                                 positions.data_ptr(), slots.data_ptr(), tables.data_ptr(),
                                 None if table_rows is None else table_rows.data_ptr(), seq_lens.data_ptr(),
                                 hidden.data_ptr(), residual.data_ptr(), scratch.data_ptr(), threads)
        return hidden.to(dtype), residual.to(dtype)
