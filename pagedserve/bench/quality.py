"""How close a quantized run's outputs are to the unquantized run's, on the same prompts (used by
benchmarks/quant.py and the quantization tests). Both runs must ask for logprobs=1 and
prompt_logprobs=1 with greedy sampling."""

from __future__ import annotations


def quality(base, other) -> tuple[float, float]:
    """Top-1 agreement and mean |logprob difference| of the same tokens, over every scored prompt
    position (teacher-forced) and every generated step before the outputs part."""
    agree, total, diffs = 0, 0, []
    for a, b in zip(base, other):
        steps = list(zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]))
        for i, (ta, tb) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)):
            steps.append((a.outputs[0].logprobs[i], b.outputs[0].logprobs[i]))
            if ta != tb:
                break
        for la, lb in steps:
            total += 1
            agree += max(la, key=lambda t: la[t].logprob) == max(lb, key=lambda t: lb[t].logprob)
            diffs += [abs(la[t].logprob - lb[t].logprob) for t in set(la) & set(lb)]
    return agree / total, sum(diffs) / len(diffs)
