"""Offline LLM generation beyond parity with transformers: structured outputs; seeds; n > 1; stop
strings, also cut by the engine without another step; chat; the checkpoint's generation defaults;
bad input and a failed step, after which the engine keeps serving."""

from __future__ import annotations

import re

import pytest
from test_llm import CONFIGS, prompts_for

from pagedserve import LLM, SamplingParams, StructuredOutputsParams


@pytest.mark.parametrize("config", ["default", "preemption"])
def test_structured_outputs(model_dirs, config):
    import json

    import jsonschema

    llm = LLM(str(model_dirs("llama")), **CONFIGS[config])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22, 333]}},
              "required": ["ok", "n"], "additionalProperties": False}
    prompts = prompts_for(llm.config.model.vocab_size, lengths=(5, 9, 7, 6), seed=2)
    params = [
        SamplingParams(max_tokens=30, temperature=1.0, seed=1, structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(max_tokens=30, temperature=1.0, seed=2,
                       structured_outputs=StructuredOutputsParams(regex="[0-9a-f]{12}")),
        SamplingParams(max_tokens=30, temperature=0.0, structured_outputs=StructuredOutputsParams(choice=["no", "maybe so"])),
        SamplingParams(max_tokens=30, temperature=1.0, seed=4, ignore_eos=True),  # unconstrained, beside them
    ]
    outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    jsonschema.validate(json.loads(outs[0].text), schema)
    assert re.fullmatch("[0-9a-f]{12}", outs[1].text) and outs[2].text in ("no", "maybe so")
    assert [o.finish_reason for o in outs] == ["stop", "stop", "stop", "length"]
    if config == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0  # a resumed matcher replays its tokens
    # a grammar that does not compile fails its request alone, as the server answers it alone
    bogus = SamplingParams(max_tokens=3, structured_outputs=StructuredOutputsParams(json={"type": "bogus"}))
    bad, good = llm.generate(["x", "y"], [bogus, SamplingParams(max_tokens=3, ignore_eos=True)], use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error" and 'Unsupported type "bogus"' in bad.outputs[0].error
    assert bad.outputs[0].token_ids == [] and len(good.outputs[0].token_ids) == 3 and good.outputs[0].error is None
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    assert llm.engine.scheduler.kv.pool.num_free_blocks == llm.runner.num_blocks  # nothing left behind
    assert not llm.runner.structured.matchers  # the matchers left with their requests


def test_seeded_sampling_ignores_batch_composition(model_dirs):
    llm = LLM(str(model_dirs("llama")))
    prompts = prompts_for(llm.config.model.vocab_size, lengths=(9, 30, 14, 3), seed=3)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": prompts[0]}, seeded, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(
        [{"prompt_token_ids": p} for p in prompts[1:]] + [{"prompt_token_ids": prompts[0]}],
        [other, other, other, seeded],
        use_tqdm=False,
    )
    assert batch[-1].outputs[0].token_ids == alone
    unseeded = llm.generate({"prompt_token_ids": prompts[0]}, other, use_tqdm=False)[0].outputs[0].token_ids
    assert len(unseeded) == 7


def test_parallel_samples_share_prompt_blocks(model_dirs):
    llm = LLM(str(model_dirs("llama")), block_size=16)
    prompt = prompts_for(llm.config.model.vocab_size, lengths=(40,))[0]
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 5 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds per sample
    kv = llm.engine.scheduler.kv
    assert kv.prefix_hit_tokens == 3 * 32  # samples 2..4 reuse the 2 full prompt blocks of sample 1
    assert kv.pool.num_free_blocks == llm.runner.num_blocks


def test_stop_strings_and_text(model_dirs):
    llm = LLM(str(model_dirs("llama")))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0]
    assert full.text == llm.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert full.finish_reason == "length"
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), full.text
    cut = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)
    comp = cut[0].outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == full.text[: full.text.find(stop)]
    kept = llm.generate(
        "The quick brown fox",
        SamplingParams(temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == full.text[: full.text.find(stop) + len(stop)]


def test_chat_applies_template(model_dirs):
    llm = LLM(str(model_dirs("qwen2")))
    messages = [{"role": "user", "content": "Hello there"}]
    params = SamplingParams(temperature=0, max_tokens=6)
    chat = llm.chat(messages, params, use_tqdm=False)[0]
    ids = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    direct = llm.generate({"prompt_token_ids": llm.tokenizer.encode(ids, add_special_tokens=False)}, params, use_tqdm=False)
    assert chat.outputs[0].token_ids == direct[0].outputs[0].token_ids
    assert "<|im_start|>assistant" in chat.prompt
    two = llm.chat([messages, messages + [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]], params, use_tqdm=False)
    assert len(two) == 2


def test_bad_input_raises_clear_errors(model_dirs):
    llm = LLM(str(model_dirs("llama")), max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens"):
        llm.generate({"prompt_token_ids": [11] * 64}, use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    vocab = llm.config.model.vocab_size
    for bad in ({"stop_token_ids": [vocab]}, {"logit_bias": {vocab + 5: 1.0}}):  # served: 400, offline: ValueError
        with pytest.raises(ValueError, match=f"out of range for a vocabulary of {vocab}"):
            llm.generate(["fine", "x"], SamplingParams(**bad), use_tqdm=False)
    with pytest.raises(ValueError, match="you requested 70 tokens"):
        llm.generate({"prompt_token_ids": [11] * 10}, SamplingParams(max_tokens=60), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompts must be a prompt or a list of prompts"):
        llm.generate(5, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids must be a list of token ids"):
        llm.generate({"prompt_token_ids": "11 12"}, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams, a list of them"):
        llm.generate("ok", {"max_tokens": 2}, use_tqdm=False)
    with pytest.raises(ValueError, match="lora_request must be a LoRARequest, a list of them"):
        llm.generate("ok", lora_request="adapter", use_tqdm=False)
    # the engine is untouched and keeps serving
    assert not llm.engine.has_unfinished()
    assert len(llm.generate("ok", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize(("device", "message"), [
    ("foo", "device must be 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
    ("mps", "device must be 'cpu', 'cuda' or 'cuda:N', got 'mps'"),
    ("cuda:64", "device 'cuda:64' is not there"),
])
def test_a_device_this_machine_lacks_raises_value_error(model_dirs, device, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(str(model_dirs("llama")), device=device)


def test_generation_config_supplies_defaults(model_dirs, tmp_path):
    import json
    import shutil

    path = tmp_path / "model"
    shutil.copytree(model_dirs("llama"), path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(temperature=0.0, max_new_tokens=5)
    (path / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(path))
    defaults = llm.get_default_sampling_params()
    assert defaults.temperature == 0.0 and defaults.max_tokens == 5
    prompt = {"prompt_token_ids": [11, 12, 13, 14]}
    out = llm.generate(prompt, use_tqdm=False)[0].outputs[0]  # no SamplingParams: the checkpoint's
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy.token_ids and len(out.token_ids) <= 5
    # passed SamplingParams: the model's defaults still fill what it leaves unset (vLLM's rule)
    seeded = llm.generate(prompt, SamplingParams(seed=3, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(seeded.token_ids) == 5 and seeded.token_ids[: len(greedy.token_ids)] == greedy.token_ids
    hot = llm.generate(prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=9, ignore_eos=True), use_tqdm=False)
    assert len(hot[0].outputs[0].token_ids) == 9  # set fields win


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(model_dirs):
    llm = LLM(str(model_dirs("llama")), max_model_len=48)
    messages = [{"role": "user", "content": "Hi"}]
    out = llm.chat(messages, SamplingParams(temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 48
    assert out.outputs[0].finish_reason == "length"
    short = llm.generate({"prompt_token_ids": out.prompt_token_ids}, SamplingParams(temperature=0, ignore_eos=True),
                         use_tqdm=False)[0]
    assert len(short.outputs[0].token_ids) == 16  # completions keep vLLM's default


def test_a_failed_step_fails_only_its_requests(model_dirs):
    """The engine core's recovery when the executor raises (the service turns this into HTTP 500
    for those requests): their blocks return to the pool and later requests are served."""
    llm = LLM(str(model_dirs("llama")))
    core, runner = llm.engine, llm.runner

    class FailOnce:
        def __init__(self):
            self.failed = False

        def execute(self, plan):
            if not self.failed:
                self.failed = True
                raise RuntimeError("injected fault")
            return runner.execute(plan)

    core.pipeline.executor = FailOnce()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    core.add_request(core.make_request("a", [11, 12, 13], params))
    with pytest.raises(RuntimeError):
        core.step()
    assert core.fail_last_step() == ["a"]
    assert not core.has_unfinished()
    assert core.scheduler.kv.pool.num_free_blocks == runner.num_blocks
    core.pipeline.executor = runner
    out = llm.generate({"prompt_token_ids": [11, 12, 13]}, params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4


def test_the_engine_stops_on_a_stop_string_without_another_step(model_dirs):
    """The engine finishes a request on the step whose token completed a stop string (as on
    EOS), so no token is sampled after it, and the processor cuts the text at the same place."""
    llm = LLM(str(model_dirs("llama")))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    core, prompt = llm.engine, llm.tokenizer.encode("The quick brown fox")
    core.add_request(core.make_request("s", prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                                    ignore_eos=True)))
    sampled, finish = [], None
    while core.has_unfinished():
        for delta in core.step():
            sampled += delta.new_token_ids
            finish = delta.finish_reason or finish
    cut = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert finish == "stop" and len(sampled) < len(full.token_ids)
    assert sampled == cut.token_ids == full.token_ids[: len(sampled)]  # nothing after the stop's token
    assert cut.text == full.text[: full.text.find(stop)] and cut.stop_reason == stop
