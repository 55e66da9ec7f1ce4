"""Triton attention over the paged KV cache (the GPU backend).

build() turns the step's CommonAttentionMetadata into device tensors once (the padded int32
block table, seq_lens, the prefill query offsets; on CUDA copied from pinned memory without
blocking) together with the host-side maxima the kernels need for their grids, so no layer
forces a device sync. forward() writes this step's K/V into the cache, then runs the decode
kernel over the first num_decodes requests and the prefill kernel over the rest.

graph_decode_metadata() is the CUDA-graph variant for decode-only batches: it wraps static
tensors the caller refills before each replay, with a grid fixed by the padded batch size,
max_model_len and a fixed split count, so nothing in it depends on the step.
graph_query_metadata() is the variant for steps of up to q query tokens per request (verifying
speculative proposals): every request through the prefill kernel, its grid fixed by the padded
batch size and q.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from services.worker.layers.attention_backend import CommonAttentionMetadata
from services.worker.transfer import tensor_to_device, to_device


@dataclass
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with block 0
    seq_lens: torch.Tensor  # [B] int32
    num_decodes: int
    decode_max_seq_len: int
    prefill_query_start_loc: torch.Tensor | None  # [B_prefill + 1] int32, from 0
    prefill_token_start: int  # first prefill token in the flattened batch (= num_decodes)
    prefill_max_query_len: int
    # None: the decode kernel's heuristic for this step. Set (CUDA graphs): that many splits per
    # request, each request's context spread evenly over them.
    decode_num_splits: int | None = None
    # the output starts zeroed: tokens no request owns (a verify graph's padding) come out as zeros
    zeroed_out: bool = False


def _interpreting() -> bool:
    from kernels._checks import interpreting

    return interpreting()


class TritonAttentionBackend:
    """Paged attention with the Triton kernels in kernels/; needs CUDA (or TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, device: torch.device | str):
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "the triton attention backend needs the `triton` package (pip install triton); "
                "set PAGEDSERVE_ATTENTION_BACKEND=torch to use the torch backend instead"
            ) from exc
        self.device = torch.device(device)
        if self.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"the triton attention backend runs on CUDA devices, got {self.device}; set "
                "PAGEDSERVE_ATTENTION_BACKEND=torch (or TRITON_INTERPRET=1 to run the kernels slowly on CPU)"
            )
        from kernels.kv_cache_write import kv_cache_write
        from kernels.paged_attention_decode import paged_attention_decode
        from kernels.paged_attention_prefill import paged_attention_prefill

        self._write, self._decode, self._prefill = kv_cache_write, paged_attention_decode, paged_attention_prefill

    def build(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        device, nd = common.device, common.num_decodes
        qsl = common.query_start_loc
        prefill_qsl, max_q = None, 0
        if nd < common.num_reqs:
            offsets = [x - qsl[nd] for x in qsl[nd:]]
            max_q = max(b - a for a, b in itertools.pairwise(offsets))
            prefill_qsl = tensor_to_device(offsets, torch.int32, device)
        return TritonAttentionMetadata(
            slot_mapping=common.slot_mapping.to(device=device, dtype=torch.int64),
            block_tables=to_device(torch.from_numpy(common.block_table), device),
            seq_lens=tensor_to_device(common.seq_lens, torch.int32, device),
            num_decodes=nd,
            decode_max_seq_len=max(common.seq_lens[:nd], default=0),
            prefill_query_start_loc=prefill_qsl,
            prefill_token_start=qsl[nd],
            prefill_max_query_len=max_q,
        )

    def graph_decode_metadata(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        max_seq_len: int,
        num_splits: int,
    ) -> TritonAttentionMetadata:
        """Metadata of a decode-only batch over caller-owned static tensors (a CUDA graph's inputs):
        slot_mapping [B] int64 (-1: padding row, not written), block_tables [B, W] int32 with
        W * block_size >= max_seq_len, seq_lens [B] int32 (0: padding row, attends to nothing and
        outputs zeros). max_seq_len bounds every request (max_model_len) and num_splits is fixed,
        so the kernels' grids and arguments stay the same from step to step."""
        batch = slot_mapping.shape[0]
        if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
            raise ValueError(
                f"graph decode metadata needs {batch} rows everywhere, got block_tables "
                f"{tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)}"
            )
        return TritonAttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens,
            num_decodes=batch,
            decode_max_seq_len=max_seq_len,
            prefill_query_start_loc=None,
            prefill_token_start=batch,
            prefill_max_query_len=0,
            decode_num_splits=num_splits,
        )

    def graph_query_metadata(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        max_query_len: int,
    ) -> TritonAttentionMetadata:
        """Metadata of a batch of B requests with up to max_query_len query tokens each over
        caller-owned static tensors (a CUDA graph's inputs): slot_mapping [B * max_query_len] int64
        (-1: a padding token, not written), block_tables [B, W] int32, seq_lens [B] int32 and
        query_start_loc [B + 1] int32 (a padding request: no tokens and seq_len 0). Tokens past
        query_start_loc[B] belong to no request and come out as zeros."""
        batch = seq_lens.shape[0]
        if block_tables.shape[0] != batch or query_start_loc.shape[0] != batch + 1:
            raise ValueError(
                f"graph query metadata needs {batch} requests everywhere, got block_tables "
                f"{tuple(block_tables.shape)} and query_start_loc {tuple(query_start_loc.shape)}"
            )
        if slot_mapping.shape[0] != batch * max_query_len:
            raise ValueError(f"graph query metadata needs {batch} x {max_query_len} slots, got "
                             f"{slot_mapping.shape[0]}")
        return TritonAttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens,
            num_decodes=0,
            decode_max_seq_len=0,
            prefill_query_start_loc=query_start_loc,
            prefill_token_start=0,
            prefill_max_query_len=max_query_len,
            zeroed_out=True,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: TritonAttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        """Write k/v ([T, Hkv, D]) into kv_cache, then attend q ([T, H, D]); returns [T, H, D].
        An fp8 kv_cache stores k / k_scale and v / v_scale."""
        self._write(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.zeros_like(q) if meta.zeroed_out else torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self._decode(
                q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                max_seq_len=meta.decode_max_seq_len, num_splits=meta.decode_num_splits,
                balance_splits=meta.decode_num_splits is not None, out=out[:nd], k_scale=k_scale, v_scale=v_scale,
            )
        if meta.prefill_query_start_loc is not None:
            start = meta.prefill_token_start
            self._prefill(
                q[start:], kv_cache, meta.block_tables[nd:], meta.seq_lens[nd:], meta.prefill_query_start_loc,
                scale, max_query_len=meta.prefill_max_query_len, out=out[start:], k_scale=k_scale, v_scale=v_scale,
            )
        return out
