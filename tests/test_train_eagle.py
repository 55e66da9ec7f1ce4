"""benchmarks/train_eagle.py on a tiny Llama target: training lowers the loss, the features it
trains on are the hidden states pagedserve's EAGLE-1 path feeds a head, and the head it writes
loads in the engine, which drafts what the trainer's torch head predicts (the two agree on the
format), keeps greedy output token for token, and accepts far more of its drafts over the
prompts it was trained on than of a random head's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_outputs import collect_outputs
from test_spec_decode_draft import make_runner

from services.engine.core import EngineCore
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig

SEED, PROMPTS, INPUT_LEN, OUTPUT_LEN, K = 11, 12, 16, 24, 3


@pytest.fixture(scope="module")
def trained(model_dirs, tmp_path_factory) -> tuple[str, str, dict]:
    from benchmarks import train_eagle

    target = str(model_dirs("llama"))
    out = tmp_path_factory.mktemp("eagle-trained")
    summary = train_eagle.main([
        target, str(out), "--num-prompts", str(PROMPTS), "--heldout-prompts", "4",
        "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
        "--epochs", "150", "--batch-size", "4", "--lr", "1e-2", "--ce-weight", "0.5",
        "--seed", str(SEED), "--kv-cache-memory", str(8 << 20), "--threads", str(torch.get_num_threads())])
    return target, str(out), summary


def training_prompts(target: str) -> list[list[int]]:
    from benchmarks.eagle_data import build_prompts
    from shared.config import ModelConfig

    return build_prompts(PROMPTS, INPUT_LEN, ModelConfig.from_pretrained(target).vocab_size, SEED)[0]


def run_engine(target: str, head: str | None, prompts: list[list[int]]) -> tuple[dict, EngineCore, list]:
    """Greedy outputs of prompts, the engine, and after each step each request's (id, tokens, drafts)."""
    spec = None if head is None else SpeculativeConfig(method="eagle", model=head, num_speculative_tokens=K,
                                                       draft_cost=0.0)
    runner = make_runner(target, spec, kv_cache_memory=16 << 20)
    engine = EngineCore(dataclasses.replace(runner.config, speculative=spec), runner, runner.num_blocks)
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(str(i), prompt, params))
    seen: list = []

    def record(engine: EngineCore) -> None:
        seen.extend((r.req_id, list(r.token_ids), list(r.draft_token_ids))
                    for r in engine.scheduler.running if r.draft_token_ids)

    return collect_outputs(engine, record), engine, seen


def torch_drafts(head, tokens: list[int], features: torch.Tensor, k: int) -> list[int]:
    """The trainer's head drafting greedily after tokens, as the engine does: its first draft
    from the target's features of tokens (features: at least len(tokens) rows), each next one from
    its own output state fed back."""
    ids, feats, drafts = torch.tensor([tokens[1:]]), features[None, : len(tokens) - 1], []
    with torch.no_grad():
        for _ in range(k):
            predicted = head(ids, feats)[:, -1:]
            drafts.append(int(head.logits(predicted).argmax(dim=-1)))
            ids = torch.cat([ids, torch.tensor([[drafts[-1]]])], dim=1)
            feats = torch.cat([feats, predicted], dim=1)
    return drafts


def test_training_lowers_the_loss(trained):
    *_, summary = trained
    first, last = summary["losses"][0], summary["losses"][-1]
    assert last < 0.5 * first, summary["losses"]
    assert summary["feature_agreement"] == 1.0  # the features' greedy tokens are the engine's


def test_the_features_are_what_the_engine_feeds_the_head(trained, monkeypatch):
    """The hidden states the model runner hands the EAGLE runner for a prompt's prefill are the
    trainer's features of that prompt."""
    from benchmarks.eagle_data import target_features
    from services.worker.eagle_runner import EagleRunner

    target, head, _ = trained
    prompt = training_prompts(target)[0]
    got, propose = [], EagleRunner._propose

    def recording(self, plan, table, samplers, inputs, hidden):
        got.append(hidden.clone())
        return propose(self, plan, table, samplers, inputs, hidden)

    monkeypatch.setattr(EagleRunner, "_propose", recording)
    run_engine(target, head, [prompt])
    features, _ = target_features(target, torch.tensor([prompt]))
    assert got[0].shape[0] == len(prompt)
    torch.testing.assert_close(got[0], features[0], atol=1e-4, rtol=1e-4)


def test_the_engine_drafts_what_the_trained_head_predicts(trained):
    from benchmarks.eagle_data import target_features
    from benchmarks.eagle_head import Frozen, TorchEagleHead

    target, head_dir, _ = trained
    prompts = training_prompts(target)
    plain, _, _ = run_engine(target, None, prompts)
    out, engine, seen = run_engine(target, head_dir, prompts)
    assert {r: o["tokens"] for r, o in out.items()} == {r: o["tokens"] for r, o in plain.items()}
    head = TorchEagleHead.from_checkpoint(head_dir, Frozen.load(target)).eval()
    ids = sorted(out, key=int)
    sequences = torch.tensor([prompts[int(i)] + out[i]["tokens"] for i in ids])
    features = dict(zip(ids, target_features(target, sequences)[0]))
    firsts = [(r, tokens, drafts) for r, tokens, drafts in seen if len(tokens) == INPUT_LEN + 1]
    assert len(firsts) == len(prompts)  # every request drafted after its prefill
    for r, tokens, drafts in firsts:
        assert torch_drafts(head, tokens, features[r], 1)[0] == drafts[0]
    chains = [torch_drafts(head, tokens, features[r], len(drafts)) == drafts for r, tokens, drafts in seen[::5]]
    assert sum(chains) >= 0.9 * len(chains)
    counts = engine.scheduler.spec
    assert counts.num_accepted_tokens > 0.5 * counts.num_draft_tokens > 0, vars(counts)


def test_a_trained_head_is_accepted_far_more_than_a_random_one(trained, tmp_path):
    from pagedserve.test_eagle import make_eagle_head

    target, head_dir, _ = trained
    prompts = training_prompts(target)
    rates = []
    for head in (head_dir, str(make_eagle_head(target, tmp_path / "random", "eagle"))):
        counts = run_engine(target, head, prompts)[1].scheduler.spec
        rates.append(counts.num_accepted_tokens / max(1, counts.num_draft_tokens))
    assert rates[0] > rates[1] + 0.3, rates
