"""Triton attention over the paged KV cache (the GPU backend).

build() turns the step's CommonAttentionMetadata into device tensors once (the padded int32
block table, seq_lens, the prefill query offsets) together with the host-side maxima the kernels
need for their grids, so no layer forces a device sync. forward() writes this step's K/V into
the cache, then runs the decode kernel over the first num_decodes requests and the prefill
kernel over the rest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from services.worker.layers.attention import CommonAttentionMetadata


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
        width = max(1, max((len(t) for t in common.block_tables), default=1))
        table = [list(t) + [0] * (width - len(t)) for t in common.block_tables]
        qsl = common.query_start_loc
        prefill_qsl, max_q = None, 0
        if nd < common.num_reqs:
            offsets = [x - qsl[nd] for x in qsl[nd:]]
            max_q = max(b - a for a, b in itertools.pairwise(offsets))
            prefill_qsl = torch.tensor(offsets, dtype=torch.int32).to(device)
        return TritonAttentionMetadata(
            slot_mapping=common.slot_mapping.to(device=device, dtype=torch.int64),
            block_tables=torch.tensor(table, dtype=torch.int32).reshape(len(table), width).to(device),
            seq_lens=torch.tensor(common.seq_lens, dtype=torch.int32).to(device),
            num_decodes=nd,
            decode_max_seq_len=max(common.seq_lens[:nd], default=0),
            prefill_query_start_loc=prefill_qsl,
            prefill_token_start=qsl[nd],
            prefill_max_query_len=max_q,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: TritonAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write k/v ([T, Hkv, D]) into kv_cache, then attend q ([T, H, D]); returns [T, H, D]."""
        self._write(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self._decode(
                q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                max_seq_len=meta.decode_max_seq_len, out=out[:nd],
            )
        if meta.prefill_query_start_loc is not None:
            start = meta.prefill_token_start
            self._prefill(
                q[start:], kv_cache, meta.block_tables[nd:], meta.seq_lens[nd:], meta.prefill_query_start_loc,
                scale, max_query_len=meta.prefill_max_query_len, out=out[start:],
            )
        return out
