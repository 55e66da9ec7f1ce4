"""`pagedserve bench throughput` and `pagedserve bench latency`: the offline LLM, in this process.

throughput: every request of a dataset at once, reporting requests/s and tokens/s under vLLM's
keys. latency: one batch of fixed lengths, timed over --num-iters after --num-iters-warmup,
reporting the mean and the percentiles of the batch latency.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pagedserve.bench.datasets import SampleRequest, load_requests
from pagedserve.bench.metrics import percentile

_LLM_ARGS = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "seed",
             "block_size", "kv_cache_memory", "enforce_eager")


def make_llm(args: argparse.Namespace):
    from pagedserve import LLM

    if not args.model:
        raise ValueError("a model is required (--model)")
    return LLM(args.model, **{name: getattr(args, name) for name in _LLM_ARGS})


def _prompt(req: SampleRequest):
    return req.prompt if isinstance(req.prompt, str) else {"prompt_token_ids": req.prompt}


def _params(output_len: int):
    from pagedserve import SamplingParams

    return SamplingParams(temperature=1.0, top_p=1.0, max_tokens=output_len, ignore_eos=True)


def run_throughput(args: argparse.Namespace) -> dict:
    llm = make_llm(args)
    requests = load_requests(args, llm.config.model.vocab_size, llm.tokenizer)
    start = time.perf_counter()
    outs = llm.generate([_prompt(r) for r in requests], [_params(r.output_len) for r in requests],
                        use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start
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
    params = _params(args.output_len)

    def once() -> float:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in range(args.num_iters_warmup):
        once()
    latencies = [once() for _ in range(args.num_iters)]
    ordered = sorted(latencies)
    return {
        "avg_latency": statistics.fmean(latencies), "latencies": latencies,
        "percentiles": {str(q): percentile(ordered, q) for q in (10, 25, 50, 75, 90, 99)},
    }
