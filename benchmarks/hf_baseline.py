"""The transformers baseline of benchmarks/throughput.py: greedy `generate` on static, length-sorted,
left-padded batches, EOS ignored."""

from __future__ import annotations

import argparse
from pathlib import Path

from pagedserve.bench.datasets import SampleRequest
from pagedserve.bench.offline import Timing, timed


def _hf_batch(model, batch: list[SampleRequest], pad_id: int) -> list[list[int]]:
    """Greedy generate for one left-padded batch; each row trimmed to its requested length."""
    import torch

    width = max(len(r.prompt) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[row, width - len(r.prompt) :] = 1
    new = max(r.output_len for r in batch)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        eos_token_id=None,
        pad_token_id=pad_id,
    )
    return [out[row, width : width + r.output_len].tolist() for row, r in enumerate(batch)]


def run_hf(args: argparse.Namespace, model_dir: Path, reqs: list[SampleRequest],
           warm: list[SampleRequest]) -> tuple[list[list[int]], Timing]:
    """Time transformers' generate on static batches of length-sorted requests."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, args.dtype)).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, like ignore_eos=True
    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i].prompt))
    bs = args.hf_batch_size
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    outputs: list[list[int]] = [[] for _ in reqs]
    with torch.inference_mode():
        _hf_batch(model, warm, pad_id=0)
        with timed() as t:
            for idx in batches:
                for i, toks in zip(idx, _hf_batch(model, [reqs[i] for i in idx], pad_id=0)):
                    outputs[i] = toks
    return outputs, t
