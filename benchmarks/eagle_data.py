"""Self-distillation data for an EAGLE-1 head (benchmarks/train_eagle.py): the target's own greedy
continuations of prompts built as benchmarks/spec_decode.py's workloads (random token ids, and a
random 16-token span repeated), generated with pagedserve's offline `LLM`, and the target's
features at every position of prompt + output.

The features are what pagedserve's EAGLE-1 path feeds a head (services/worker/eagle_runner.py):
the target's last hidden state after its final norm, here from transformers' model in float32
(`last_hidden_state` of the base model, which is the final-normed state). The labels are the
target's greedy next token after each position (the argmax of its LM head over the feature); on
the generated positions they must equal what the engine generated (`agreement`), a check that the
two compute the same states.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from pathlib import Path

import torch

from benchmarks.spec_decode import WORKLOADS
from benchmarks.spec_decode import prompts as workload_prompts


@dataclasses.dataclass
class Sequences:
    """N sequences of prompt_len + output tokens, one length."""

    tokens: torch.Tensor  # [N, L] int64
    features: torch.Tensor  # [N, L, hidden] float32: the target's final-normed last hidden states
    labels: torch.Tensor  # [N, L] int64: the target's greedy token after each position
    workloads: list[str]  # per sequence
    prompt_len: int
    agreement: float  # share of generated tokens equal to the label before them

    def __len__(self) -> int:
        return self.tokens.shape[0]


def build_prompts(num: int, length: int, vocab: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """num prompts, half of each workload (spec_decode.prompts), seeded apart per workload."""
    out, names = [], []
    for i, workload in enumerate(WORKLOADS):
        n = num // len(WORKLOADS) + (i < num % len(WORKLOADS))
        out += workload_prompts(workload, n, length, vocab, seed + 10_000 * i)
        names += [workload] * n
    return out, names


def greedy_outputs(target_dir: str | Path, prompts: list[list[int]], output_len: int, device: str,
                   kv_cache_memory: int, max_num_seqs: int) -> list[list[int]]:
    """The target's greedy continuations (temperature 0, ignore_eos) from pagedserve's `LLM`."""
    from pagedserve import LLM
    from shared.sampling_params import SamplingParams

    llm = LLM(str(target_dir), max_model_len=len(prompts[0]) + output_len + 8, max_num_seqs=max_num_seqs,
              kv_cache_memory=kv_cache_memory, device=device)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in outputs]


@torch.no_grad()
def target_features(target_dir: str | Path, sequences: torch.Tensor,
                    batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] token ids -> (features [N, L, hidden], labels [N, L]) from transformers' model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    features, labels = [], []
    for chunk in sequences.split(batch_size):
        hidden = model.model(input_ids=chunk).last_hidden_state
        features.append(hidden)
        labels.append(model.lm_head(hidden).argmax(dim=-1))
    del model
    gc.collect()
    return torch.cat(features), torch.cat(labels)


def build(target_dir: str | Path, splits: list[tuple[int, int]], input_len: int, output_len: int, vocab: int,
          device: str = "cpu", kv_cache_memory: int = 1 << 30, max_num_seqs: int = 64) -> list[Sequences]:
    """One Sequences per split (number of prompts, seed): the prompts (both workloads), their
    greedy continuations and the target's features, all generated in one go."""
    prompts, names, bounds = [], [], [0]
    for num, seed in splits:
        split_prompts, split_names = build_prompts(num, input_len, vocab, seed)
        prompts, names = prompts + split_prompts, names + split_names
        bounds.append(len(prompts))
    outputs = greedy_outputs(target_dir, prompts, output_len, device, kv_cache_memory, max_num_seqs)
    tokens = torch.tensor([p + o for p, o in zip(prompts, outputs)], dtype=torch.long)
    features, labels = target_features(target_dir, tokens)
    out = []
    for lo, hi in itertools.pairwise(bounds):
        agreement = (labels[lo:hi, input_len - 1 : -1] == tokens[lo:hi, input_len:]).float().mean().item()
        out.append(Sequences(tokens[lo:hi], features[lo:hi], labels[lo:hi], names[lo:hi], input_len, agreement))
    return out
