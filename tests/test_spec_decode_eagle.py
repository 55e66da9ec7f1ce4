"""Speculative decoding with EAGLE and EAGLE-3 heads (pagedserve/test_eagle.py writes them in the
real checkpoint formats) over the real model runner, in one process. Random heads: every kind of
request ends with the outputs of non-speculative decoding, with chunked prefill, prefix caching
and a pool small enough to preempt, and every block returns. Probe heads, whose drafts follow
from the target's hidden states (in safetensors or pytorch_model.bin): each draft is the token the wiring predicts (the last layer's
state after the final norm for EAGLE-1, the aux layers' inputs in config order for EAGLE-3, the
head's own state fed to its next position). A head that computes the target's layer one position
later has most drafts accepted (the head reads the next token and keeps its KV right). `LLM`
speculates with a head as the engine does. Heads that cannot serve the target (another hidden
size, aux layers it lacks, no fc, a d2t out of range) are refused at startup. With async
scheduling the worker proposes from the head too, over tensor-parallel ranks each runs the head
whole, and over pipeline stages the last one runs it (an EAGLE-3 head's aux states coming from
every stage) and drafts as one stage does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from engine_outputs import assert_same_outputs, collect_outputs
from test_spec_decode import generate
from test_spec_decode_async import generate_async
from test_spec_decode_draft import SETUPS, make_runner

from services.engine.core import EngineCore
from shared.config import EngineConfig, ModelConfig, SchedulerConfig
from shared.sampling_params import SamplingParams
from shared.speculative import SpeculativeConfig

METHODS = ("eagle", "eagle3")
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def target(model_dirs) -> str:
    return str(model_dirs("llama", attention_scale=0.005, config_overrides={"num_hidden_layers": 4}))


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory):
    """heads(method, kind) -> a head's directory, written once."""
    from pagedserve.test_eagle import make_eagle_head

    made: dict = {}

    def get(method: str, kind: str = "random", target_dir: str = target) -> str:
        if (method, kind, target_dir) not in made:
            out = tmp_path_factory.mktemp(f"{method}-{kind}")
            made[method, kind, target_dir] = str(make_eagle_head(target_dir, out, method, kind))
        return made[method, kind, target_dir]

    return get


def eagle_spec(model: str, method: str = "eagle", k: int = 3) -> SpeculativeConfig:
    """draft_cost 0: the adaptive rule drafts whenever proposals hold, however few are accepted."""
    return SpeculativeConfig(method=method, model=model, num_speculative_tokens=k, draft_cost=0.0)


@pytest.fixture(scope="module")
def plain(target):
    runner = make_runner(target, None)
    return {name: generate(runner, None, *setup)[0] for name, setup in SETUPS.items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_eagle_speculation_gives_the_same_outputs(target, heads, plain, method, setup):
    spec = eagle_spec(heads(method), method)
    runner = make_runner(target, spec)
    out, engine = generate(runner, spec, *SETUPS[setup])  # every block back (run_requests)
    assert_same_outputs(out, plain[setup])
    assert engine.scheduler.spec.num_draft_tokens > 0 and runner.draft.num_forwards > 0
    if setup == "preempting":
        assert engine.scheduler.num_preemptions > 0


def _drafts(runner, spec: SpeculativeConfig) -> list[tuple[list[int], list[int]]]:
    """Greedy requests run to the end: after each step, each request's tokens and drafts."""
    runner.reset()
    config = dataclasses.replace(runner.config, scheduler=SchedulerConfig(max_num_batched_tokens=32), speculative=spec)
    engine = EngineCore(config, runner, 64)
    for i in range(3):
        engine.add_request(engine.make_request(f"r{i}", [(k * 7 + 31 * i) % 300 + 3 for k in range(5 + 11 * i)], GREEDY))
    seen = []

    def record(engine: EngineCore) -> None:
        seen.extend((list(r.token_ids), r.draft_token_ids) for r in engine.scheduler.running if r.draft_token_ids)

    collect_outputs(engine, record)
    return seen


def _checked_drafts(runner, spec: SpeculativeConfig, expect) -> int:
    """How many drafts were made, each equal to expect(its request's tokens)."""
    seen = _drafts(runner, spec)
    for tokens, drafts in seen:
        assert drafts == [expect(tokens)] * len(drafts)
    return sum(len(drafts) for _, drafts in seen)


@pytest.mark.parametrize("weights", ["safetensors", "pytorch_model.bin"])
def test_eagle_drafts_from_the_targets_last_hidden_state(target, heads, tmp_path, weights):
    """Probe EAGLE-1 head: its logits are the target's at the latest position, so greedy drafts
    repeat the latest token. Alike from the head saved as pytorch_model.bin (as EAGLE's own heads are)."""
    from test_checkpoint_formats import as_pytorch_bin

    head = heads("eagle", "probe")
    if weights != "safetensors":
        head = str(as_pytorch_bin(Path(head), tmp_path / "pt"))
    spec = eagle_spec(head)
    assert _checked_drafts(make_runner(target, spec), spec, lambda tokens: tokens[-1]) >= 10


def test_eagle3_drafts_from_the_targets_aux_hidden_states(target, heads):
    """Probe EAGLE-3 head: fc selects the second aux state (layer 0's input, the token
    embedding, at the position before the latest token); its LM head is the embedding."""
    from safetensors.torch import load_file

    embedding = load_file(f"{target}/model.safetensors")["model.embed_tokens.weight"]
    best = (embedding @ embedding.T).argmax(dim=-1).tolist()  # the draft after each token
    spec = eagle_spec(heads("eagle3", "probe"), "eagle3")
    assert _checked_drafts(make_runner(target, spec), spec, lambda tokens: best[tokens[-2]]) >= 10


def test_eagle3_drafts_alike_from_the_one_call_cpu_decode_step(target, heads, monkeypatch):
    """The C decode step keeps the aux states as the layers do: a random head (whose drafts
    follow every aux state) drafts the same tokens with and without it."""
    from services.worker.models import llama_decode_cpu

    spec = eagle_spec(heads("eagle3"), "eagle3")
    runner, run, c_steps = make_runner(target, spec), llama_decode_cpu.run, {"on": True, "ran": 0}

    def switched(model, positions, hidden):
        out = run(model, positions, hidden) if c_steps["on"] else None
        c_steps["ran"] += out is not None
        return out

    monkeypatch.setattr(llama_decode_cpu, "run", switched)
    with_c = _drafts(runner, spec)
    ran, c_steps["on"] = c_steps["ran"], False
    assert _drafts(runner, spec) == with_c and len(with_c) >= 5
    assert ran > 0 or not llama_decode_cpu.decode_step_cpu.available()


@pytest.fixture(scope="module")
def unit_norm(model_dirs, tmp_path_factory) -> tuple[str, dict]:
    """A one-layer target whose final norm weight is one, and its plain outputs."""
    from pagedserve.test_eagle import with_unit_final_norm

    one_layer = model_dirs("llama", config_overrides={"num_hidden_layers": 1})
    target = str(with_unit_final_norm(one_layer, tmp_path_factory.mktemp("unit-norm")))
    return target, generate(make_runner(target, None), None, *SETUPS["roomy"])[0]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_head_that_computes_the_targets_layer_gets_accepted(unit_norm, heads, async_scheduling):
    target, want = unit_norm
    spec = eagle_spec(heads("eagle", "mimic", target))
    runner = make_runner(target, spec, scheduler=SchedulerConfig(async_scheduling=async_scheduling))
    out, engine = generate_async(runner, *SETUPS["roomy"]) if async_scheduling else generate(runner, spec, *SETUPS["roomy"])
    assert_same_outputs(out, want)
    counts = engine.scheduler.spec
    assert counts.num_accepted_tokens > 0.5 * counts.num_draft_tokens > 0


def test_a_head_whole_on_each_tensor_parallel_rank_gets_accepted(unit_norm, heads):
    """Over two tensor-parallel ranks the head runs whole on each, borrowing the target's sharded
    embedding and LM head: one rank's tokens, most drafts accepted."""
    from pagedserve import LLM

    target, _ = unit_norm
    prompts = [{"prompt_token_ids": [(k * 13 + 5 * i) % 300 + 3 for k in range(6 + 9 * i)]} for i in range(3)]
    kwargs = {"max_model_len": 128, "kv_cache_memory": 8 << 20}
    want = [o.outputs[0].token_ids for o in LLM(target, **kwargs).generate(prompts, GREEDY, use_tqdm=False)]
    spec = {"method": "eagle", "model": heads("eagle", "mimic", target), "num_speculative_tokens": 3, "draft_cost": 0}
    with LLM(target, tensor_parallel_size=2, speculative_config=spec, **kwargs) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want
        counts = llm.engine.scheduler.spec
    assert counts.num_accepted_tokens > 0.5 * counts.num_draft_tokens > 0


def _llm_drafts(llm, prompts: list[dict]) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """The greedy tokens of prompts, and each request's drafts in the order the engine got them."""
    scheduler, drafts = llm.engine.scheduler, {}
    update = scheduler.update

    def recording(plan, result):
        for req_id, tokens in result.draft_token_ids.items():
            drafts.setdefault(req_id.split("-")[-1], []).append(tokens.tolist())
        return update(plan, result)

    scheduler.update = recording
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    finally:
        scheduler.update = update
    return tokens, drafts


@pytest.mark.parametrize(("method", "tied", "aux"), [("eagle", False, None), ("eagle", True, None),
                                                    ("eagle3", False, None), ("eagle3", False, [3, 0, 1])],
                         ids=["untied", "tied", "eagle3", "eagle3-aux-3-0-1"])
def test_an_eagle_head_drafts_alike_on_the_last_pipeline_stage(model_dirs, tmp_path, method, tied, aux):
    """Over two pipeline stages the head runs on the last, embedding with a whole copy of the
    target's embedding (untied) or with its LM head (tied): the same tokens as without speculation,
    and the same drafts as on one stage (a wrong embedding would change nearly all of them). An
    EAGLE-3 head reads the states entering three layers of the 4, each stage holding two: vLLM's
    default 2, 2, 1 (layer 1's come from the first stage with its activations), or 3, 0, 1 (two
    from the first stage, out of order): all 111 drafts agreed, and 29-59 of them with the first
    stage's states zeroed, the states in layer order or the first stage's two swapped."""
    from pagedserve import LLM
    from pagedserve.test_eagle import make_eagle_head

    target = str(model_dirs("llama", attention_scale=0.005,
                            config_overrides={"num_hidden_layers": 4, "tie_word_embeddings": tied}))
    prompts = [{"prompt_token_ids": [(k * 13 + 5 * i) % 300 + 3 for k in range(6 + 9 * i)]} for i in range(3)]
    kwargs = {"max_model_len": 128, "kv_cache_memory": 8 << 20}
    want = [o.outputs[0].token_ids for o in LLM(target, **kwargs).generate(prompts, GREEDY, use_tqdm=False)]
    overrides = {"eagle_aux_hidden_state_layer_ids": aux} if aux else None
    head = make_eagle_head(target, tmp_path / "head", method, config_overrides=overrides)
    spec = {"method": method, "model": str(head), "num_speculative_tokens": 3, "draft_cost": 0}
    one_stage = _llm_drafts(LLM(target, speculative_config=spec, **kwargs), prompts)
    with LLM(target, pipeline_parallel_size=2, speculative_config=spec, **kwargs) as llm:
        tokens, drafts = _llm_drafts(llm, prompts)
    assert tokens == one_stage[0] == want
    # the same drafts at the same tokens (the stages may start drafting a step apart, or draft
    # fewer tokens in a step: a draft agrees with one of the other's that it is a prefix of, or it of it)
    def agrees(req: str, d: list[int]) -> bool:
        return any(d[: len(e)] == e[: len(d)] for e in one_stage[1].get(req, []))

    made = [(req, d) for req, ds in drafts.items() for d in ds]
    agreeing = sum(agrees(req, d) for req, d in made)
    assert len(made) >= 10 and agreeing >= 0.95 * len(made), f"{agreeing} of {len(made)} drafts agree"


def _config(target: str, spec: dict, **kwargs) -> EngineConfig:
    model = ModelConfig.from_pretrained(target, max_model_len=160)
    return EngineConfig(model, speculative=SpeculativeConfig.parse(spec), **kwargs)


def test_heads_that_cannot_serve_the_target_are_refused(target, heads, tmp_path):
    from pagedserve.test_eagle import make_eagle_head

    wide = make_eagle_head(target, tmp_path / "wide", "eagle", config_overrides={"hidden_size": 128})
    with pytest.raises(ValueError, match="hidden_size 128, the target 64"):
        _config(target, {"method": "eagle", "model": str(wide)})
    aux = make_eagle_head(target, tmp_path / "aux", "eagle3", config_overrides={"eagle_aux_hidden_state_layer_ids": [0, 9, 1]})
    with pytest.raises(ValueError, match="three of the target's 4 layers"):
        _config(target, {"method": "eagle3", "model": str(aux)})
    with pytest.raises(ValueError, match='needs a "model"'):
        SpeculativeConfig.parse({"method": "eagle3"})


def test_offline_llm_speculates_with_eagle3_and_refuses_a_head_without_fc(target, heads, tmp_path):
    from safetensors.torch import load_file, save_file

    from pagedserve import LLM
    from pagedserve.test_eagle import make_eagle_head

    prompts = [{"prompt_token_ids": [(k * 13 + 5 * i) % 300 + 3 for k in range(6 + 9 * i)]} for i in range(3)]
    kwargs = {"max_model_len": 128, "kv_cache_memory": 8 << 20}
    want = [o.outputs[0].token_ids for o in LLM(target, **kwargs).generate(prompts, GREEDY, use_tqdm=False)]
    spec = {"method": "eagle3", "model": heads("eagle3"), "num_speculative_tokens": 3, "draft_cost": 0}
    llm = LLM(target, speculative_config=spec, **kwargs)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want
    head = make_eagle_head(target, tmp_path / "nofc", "eagle")
    weights = load_file(str(head / "model.safetensors"))
    del weights["fc.weight"]
    save_file(weights, str(head / "model.safetensors"))
    with pytest.raises(ValueError, match="no fc.weight: not an EAGLE checkpoint"):
        LLM(target, speculative_config={"method": "eagle", "model": str(head), "num_speculative_tokens": 2}, **kwargs)
    bad = make_eagle_head(target, tmp_path / "d2t", "eagle3")
    weights = load_file(str(bad / "model.safetensors"))
    weights["d2t"] += 10_000
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="d2t must map each draft token"):
        LLM(target, speculative_config={"method": "eagle3", "model": str(bad)}, **kwargs)


def test_eagle3_targets_decode_without_cuda_graphs(target, heads):
    from types import SimpleNamespace

    from services.worker.cuda_graphs import graphs_unsupported

    cuda, triton = torch.device("cuda"), SimpleNamespace(name="triton")
    assert graphs_unsupported(_config(target, {"method": "eagle", "model": heads("eagle")}), cuda, triton) is None
    assert "EAGLE-3" in graphs_unsupported(_config(target, {"method": "eagle3", "model": heads("eagle3")}), cuda, triton)


def test_eagle3_aux_layers_default_as_vllm():
    from shared.eagle import aux_layer_ids

    assert aux_layer_ids({}, 32) == (2, 16, 29)
    assert aux_layer_ids({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 5, 9]}}, 32) == (1, 5, 9)
