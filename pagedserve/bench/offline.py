"""`pagedserve bench throughput` and `pagedserve bench latency`: the offline LLM, in this process.

throughput: every request of a dataset at once, reporting requests/s and tokens/s under vLLM's
keys. latency: one batch of fixed lengths, timed over --num-iters after --num-iters-warmup,
reporting the mean and the percentiles of the batch latency.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pagedserve.bench.datasets import SampleRequest, load_requests
from pagedserve.bench.metrics import percentile

_LLM_ARGS = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "seed",
             "block_size", "kv_cache_memory", "enforce_eager")


def make_llm(args: argparse.Namespace):
    from pagedserve import LLM

    if not args.model:
        raise ValueError("a model is required (--model)")
    return LLM(args.model, **{name: getattr(args, name) for name in _LLM_ARGS})


@dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process, all threads: well below wall_s x threads means a busy machine


@contextmanager
def timed() -> Iterator[Timing]:
    """Wall and process CPU seconds spent in the block."""
    t = Timing()
    wall, cpu = time.perf_counter(), time.process_time()
    yield t
    t.wall_s, t.cpu_s = time.perf_counter() - wall, time.process_time() - cpu


def _prompt(req: SampleRequest):
    return req.prompt if isinstance(req.prompt, str) else {"prompt_token_ids": req.prompt}


def _params(output_len: int, greedy: bool):
    from pagedserve import SamplingParams

    # vLLM's bench samples at temperature 1; greedy runs compare tokens with another engine.
    return SamplingParams(temperature=0.0 if greedy else 1.0, top_p=1.0, max_tokens=output_len, ignore_eos=True)


def generate(llm, requests: list[SampleRequest], greedy: bool = False, use_tqdm: bool = False,
             lora_request=None) -> tuple[list, Timing]:
    """Every request in one LLM.generate call, EOS ignored so each yields exactly output_len tokens;
    the outputs and the time it took. lora_request: as LLM.generate's (one, or one per request)."""
    prompts = [_prompt(r) for r in requests]
    params = [_params(r.output_len, greedy) for r in requests]
    with timed() as t:
        outs = llm.generate(prompts, params, use_tqdm=use_tqdm, lora_request=lora_request)
    return outs, t


def run_throughput(args: argparse.Namespace) -> dict:
    llm = make_llm(args)
    requests = load_requests(args, llm.config.model.vocab_size, llm.tokenizer)
    outs, t = generate(llm, requests, use_tqdm=not args.disable_tqdm)
    elapsed = t.wall_s
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    output_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {
        "elapsed_time": elapsed, "num_requests": len(outs), "total_num_tokens": prompt_tokens + output_tokens,
        "total_output_tokens": output_tokens, "requests_per_second": len(outs) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
    }


def run_latency(args: argparse.Namespace) -> dict:
    import random

    llm = make_llm(args)
    vocab = llm.config.model.vocab_size
    rng = random.Random(args.seed)
    prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(args.input_len)]}
               for _ in range(args.batch_size)]
    params = _params(args.output_len, greedy=False)

    def once() -> float:
        with timed() as t:
            llm.generate(prompts, params, use_tqdm=False)
        return t.wall_s

    for _ in range(args.num_iters_warmup):
        once()
    latencies = [once() for _ in range(args.num_iters)]
    ordered = sorted(latencies)
    return {
        "avg_latency": statistics.fmean(latencies), "latencies": latencies,
        "percentiles": {str(q): percentile(ordered, q) for q in (10, 25, 50, 75, 90, 99)},
    }
