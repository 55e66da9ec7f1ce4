"""Pipeline parallelism on CPU (gloo), without the services: every rank's model runner executes
the same step plans, as the engine would send them, and the last stage's greedy tokens equal one
rank's. Each stage holds only its layers' weights and KV cache. Plans that interleave two
requests let an earlier stage run ahead of the tokens it has not received yet. A stage takes the
activations of the step it runs (with an EAGLE-3 head's aux states) and refuses any other."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_models import run_ranks

from pagedserve import LLM, SamplingParams
from services.worker.pipeline import Activations, Intermediate, Outcome, StageLink
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


def _rank(rank: int, world: int, tmp: str, path: str, tp: int, fail_step: int = -1) -> None:
    """Runs _plans() on this rank; the first stage's forward raises in step fail_step."""
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
        errors, step, forward = {}, [-1], runner.model.forward
        if runner.stage.first:
            def failing(*args):
                if step[0] == fail_step:
                    raise RuntimeError("the first stage's forward failed")
                return forward(*args)
            runner.model.forward = failing
        for plan in _plans():
            step[0] = plan.step_id
            try:
                result = runner.execute(plan)
            except RuntimeError as exc:  # the step loop reports it to the engine and goes on
                errors[plan.step_id] = str(exc)
                continue
            assert not result.failed, result.failed
            for req_id, token in zip(result.req_ids, result.sampled_token_ids):
                tokens[req_id].append(token)
        runner.reset()
        dist.barrier()  # the last stage's sends are asynchronous: let them land before the group goes
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"held": held, "kv": kv, "tokens": tokens, "answers": runner.answers, "errors": errors}, f)
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


def test_a_step_the_first_stage_fails_fails_on_the_last_and_later_steps_run(model_dirs, tmp_path):
    """Step 10 (a's last decode) fails on the first stage: the last stage fails it too (its
    requests get no token) rather than waiting, and b's later steps give its tokens."""
    path = str(model_dirs("llama", config_overrides={"num_hidden_layers": 3, "tie_word_embeddings": True}))
    outs = LLM(path, max_model_len=128).generate([{"prompt_token_ids": PROMPTS[r]} for r in ("a", "b")], GREEDY,
                                                  use_tqdm=False)
    expected = {r: list(o.outputs[0].token_ids) for r, o in zip(("a", "b"), outs)}
    run_ranks(_rank, 2, str(tmp_path), path, 1, 10)
    first, last = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert first["errors"] == {"10": "the first stage's forward failed"}
    assert last["errors"] == {"10": "the previous pipeline stage failed step 10"}
    assert last["tokens"] == {"a": expected["a"][:-1], "b": expected["b"]}


def _link_rank(rank: int, world: int, tmp: str) -> None:
    """Rank 0 (the first stage) sends six steps' messages, one of them only a forged size; rank 1
    receives each expecting the step with the aux layers [1, 3] and writes down what it got."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        link = StageLink(ParallelConfig(1, rank, 2), torch.device("cpu"))
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        both = {3: x + 30, 1: x + 10}
        if rank == 0:
            link.send_activations(0, Intermediate(x, x + 1, both))
            link.send_failure(1)  # the first stage failed step 1
            link.send_activations(2, Intermediate(x, x + 1, both))
            link._send_message(Outcome(3, ["a"], [1], {}), [1], 1)  # a message that is not activations
            link._isend(torch.tensor([1 << 62]), 1, 1)  # a size no message has
            link.send_activations(5, Intermediate(x, x + 1, {1: x}))  # a stage that lost layer 3's states
        else:
            got = []
            for step in range(6):
                try:
                    out = link.recv_activations(Activations(step, 3, [1, 3]), 4, torch.float32)
                    aux = {i: t.tolist() for i, t in out.aux.items()}
                    got.append([out.hidden.tolist(), out.residual.tolist(), aux])
                except (RuntimeError, msgspec.ValidationError) as exc:  # the step fails, the worker stays up
                    got.append(f"{type(exc).__name__}: {exc}")
            with open(f"{tmp}/got.json", "w") as f:
                json.dump(got, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_stage_takes_the_activations_of_its_step_and_refuses_others(tmp_path):
    """The hidden states, residual and aux layers' states arrive as sent; a step the previous stage
    failed, a message that is not activations, activations without a layer the step expects, and
    a message size past the bound fail that step alone with an error that says so."""
    run_ranks(_link_rank, 2, str(tmp_path))
    got = json.loads((tmp_path / "got.json").read_text())
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    sent = [x.tolist(), (x + 1).tolist(), {"1": (x + 10).tolist(), "3": (x + 30).tolist()}]
    assert got[0] == got[2] == sent
    assert got[1] == "RuntimeError: the previous pipeline stage failed step 1"
    assert got[3].startswith("ValidationError: ")
    assert got[4] == f"RuntimeError: pipeline message of {1 << 62} bytes (at most {16 << 20})"
    assert got[5].startswith("RuntimeError: pipeline out of step: activations Activations(step_id=5")


@pytest.mark.parametrize("token", [-1, 2**31, 2**64 - 1])
def test_an_outcome_with_a_token_id_no_vocabulary_has_does_not_decode(token):
    """A broken or forged stage's outcome: its token ids are checked as the message decodes, so the
    earlier stage fails that step with a clear error instead of handing the id to its grammar
    matchers or its inputs."""
    good = msgspec.msgpack.encode(Outcome(3, ["a"], [5], {}))
    assert msgspec.msgpack.decode(good, type=Outcome) == Outcome(3, ["a"], [5], {})
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\[2\]\[0\]`"):
        msgspec.msgpack.decode(msgspec.msgpack.encode([3, ["a"], [token], {}]), type=Outcome)
