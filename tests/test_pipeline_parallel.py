"""Pipeline parallelism on CPU (gloo), without the services: every rank's model runner executes
the same step plans, as the engine would send them, and the last stage's greedy tokens equal one
rank's. Each stage holds only its layers' weights and KV cache. Plans that interleave two
requests let an earlier stage run ahead of the tokens it has not received yet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_models import run_ranks

from pagedserve import LLM, SamplingParams
from shared.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from shared.protocol import CachedRequestData, NewRequestData, StepPlan

PROMPTS = {"a": list(range(20, 33)), "b": [7, 8, 9, 10, 11]}
BLOCKS = {"a": [0, 1], "b": [2]}
STEPS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)


def _plans() -> list[StepPlan]:
    """a's prefill, b's prefill, then decodes alternating a, b: each plan touches one request."""
    plans, computed = [], {}
    for req_id in ("a", "b"):
        prompt = np.array(PROMPTS[req_id], dtype=np.int32)
        new = NewRequestData(req_id, prompt, np.array([], dtype=np.int32), GREEDY, [], BLOCKS[req_id], 0)
        plans.append(StepPlan(len(plans), [new], [], {req_id: len(prompt)}, []))
        computed[req_id] = len(prompt)
    for _ in range(STEPS - 1):
        for req_id in ("a", "b"):
            cached = CachedRequestData(req_id, [], computed[req_id])
            plans.append(StepPlan(len(plans), [], [cached], {req_id: 1}, []))
            computed[req_id] += 1
    plans.append(StepPlan(len(plans), [], [], {}, ["a", "b"]))
    return plans


def _rank(rank: int, world: int, tmp: str, path: str, tp: int) -> None:
    from services.worker.distributed import init_parallel_groups
    from services.worker.model_runner import ModelRunner

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        init_parallel_groups(tp, world // tp)
        parallel = ParallelConfig(tp, rank, world // tp)
        runner = ModelRunner(EngineConfig(ModelConfig.from_pretrained(path), CacheConfig(kv_cache_memory=1 << 20),
                                          parallel=parallel))
        held = [name for name, _ in runner.model.named_parameters()]
        kv = [layer for layer, t in enumerate(runner.kv_caches) if t.numel()]
        tokens: dict[str, list[int]] = {"a": [], "b": []}
        for plan in _plans():
            result = runner.execute(plan)
            assert not result.failed, result.failed
            for req_id, token in zip(result.req_ids, result.sampled_token_ids):
                tokens[req_id].append(token)
        runner.reset()
        dist.barrier()  # the last stage's sends are asynchronous: let them land before the group goes
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"held": held, "kv": kv, "tokens": tokens, "answers": runner.answers}, f)
    finally:
        dist.destroy_process_group()


# three layers over two stages: an uneven split; tied embeddings: the last stage loads its own LM
# head. (TP x PP runs through the stack in test_parallel_serve.py.)
@pytest.mark.parametrize(("layers", "tied", "tp", "pp"), [(3, True, 1, 2)], ids=["3layers-tied-pp2"])
def test_pipeline_stages_match_one_rank(model_dirs, tmp_path, layers, tied, tp, pp):
    path = str(model_dirs("llama", config_overrides={"num_hidden_layers": layers, "tie_word_embeddings": tied}))
    assert ModelConfig.from_pretrained(path).hf_config["tie_word_embeddings"] is tied
    llm = LLM(path, max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": PROMPTS[r]} for r in ("a", "b")], GREEDY, use_tqdm=False)
    expected = {r: list(o.outputs[0].token_ids) for r, o in zip(("a", "b"), outs)}
    run_ranks(_rank, tp * pp, str(tmp_path), path, tp)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(tp * pp)]
    last = (pp - 1) * tp
    assert [r["answers"] for r in ranks] == [i == last for i in range(tp * pp)]
    for i, r in enumerate(ranks):  # every rank of the last stage samples; the others only pass on
        assert r["tokens"] == (expected if i >= last else {"a": [], "b": []}), (i, r["tokens"])
    first_layers = (layers + 1) // 2  # the first stage takes the odd layer
    assert ranks[0]["kv"] == list(range(first_layers)) and ranks[-1]["kv"] == list(range(first_layers, layers))
    assert "model.embed_tokens.weight" in ranks[0]["held"] and "lm_head.weight" not in ranks[0]["held"]
    assert "model.embed_tokens.weight" not in ranks[-1]["held"] and "lm_head.weight" in ranks[-1]["held"]
    assert not any(f"layers.{first_layers}." in n for n in ranks[0]["held"])
    assert not any(f"layers.{first_layers - 1}." in n for n in ranks[-1]["held"])
