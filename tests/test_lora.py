"""Multi-LoRA offline: a batch mixing the base model and several PEFT adapters matches
transformers + peft greedy, token for token with logprobs within 1e-4 (llama, qwen2, mistral);
the prefix cache never shares KV between adapters; adapter slots are reused LRU; bad adapters
are refused with a clear ValueError, or fail their own requests alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.test_lora import make_test_adapter, make_test_adapters
from services.worker.lora.layer import LoRAMapping, lora_delta_torch
from shared.lora import WEIGHTS_FILE

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [100, 7, 300, 12, 55, 66, 77, 88, 99, 3, 4, 5, 6]]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def lora_models(model_dirs, tmp_path_factory):
    """arch -> (model path, its adapters); built once per arch."""
    built = {}

    def get(arch: str) -> tuple[Path, list[Path]]:
        if arch not in built:
            path = model_dirs(arch)
            built[arch] = path, make_test_adapters(path, 3, out_dir=tmp_path_factory.mktemp(f"lora-{arch}"))
        return built[arch]

    return get


def references(model_path: Path, adapters: dict[str, Path], cases) -> list[tuple[list[int], list[float]]]:
    """transformers (+ peft, every adapter on one model) greedy tokens and their logprobs, at float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    results = []
    for prompt, lora in cases:
        if lora is None:
            with model.disable_adapter():
                results.append(_greedy(model, prompt))
        else:
            model.set_adapter(lora.lora_name)
            results.append(_greedy(model, prompt))
    return results


def _greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, tokens)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_mixed_batch_matches_peft(lora_models, arch):
    path, adapters = lora_models(arch)
    a, b = LoRARequest("a", 1, str(adapters[0])), LoRARequest("b", 2, str(adapters[1]))
    llm = LLM(str(path), enable_lora=True, max_loras=2, max_lora_rank=16, kv_cache_memory=1 << 24,
              enable_prefix_caching=False)
    cases = [(p, lora) for p in PROMPTS[::2] for lora in (None, a, b)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in cases], params, use_tqdm=False,
                        lora_request=[lora for _, lora in cases])
    for (_, lora), out, (tokens, lps) in zip(cases, outs, references(path, {"a": adapters[0], "b": adapters[1]}, cases)):
        got = out.outputs[0]
        assert got.token_ids == tokens, (arch, lora)
        ours = [next(iter(d.values())).logprob for d in got.logprobs]
        assert ours == pytest.approx(lps, abs=1e-4), (arch, lora)
    by_adapter = {lora: out.outputs[0].token_ids for (p, lora), out in zip(cases, outs) if p == PROMPTS[0]}
    assert len({tuple(t) for t in by_adapter.values()}) == 3  # each adapter changes the output


@pytest.fixture(scope="module")
def llama_lora(lora_models):
    path, adapters = lora_models("llama")
    llm = LLM(str(path), enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=16, kv_cache_memory=1 << 24,
              block_size=4)
    return llm, [LoRARequest(f"ad{i}", i + 1, str(p)) for i, p in enumerate(adapters)]


def _run(llm: LLM, prompts, loras):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)


def test_prefix_cache_is_keyed_by_adapter(llama_lora):
    llm, (a, b, _) = llama_lora
    prompt = list(range(200, 221))  # five full blocks of 4
    first = [_run(llm, [prompt], [lora])[0] for lora in (None, a, b)]
    assert [o.num_cached_tokens for o in first] == [0, 0, 0]  # nothing shared across adapters
    again = [_run(llm, [prompt], [lora])[0] for lora in (None, a, b)]
    assert all(o.num_cached_tokens == 20 for o in again)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]


def test_more_adapters_than_slots_take_turns(llama_lora):
    """Three adapters over two device slots and two host copies: every request gets its own
    adapter's tokens (as when run alone), slots and host copies are reused least-recently-used."""
    llm, loras = llama_lora
    alone = [_run(llm, [PROMPTS[0]], [lora])[0].outputs[0].token_ids for lora in loras]
    manager = llm.runner.lora
    loads = manager.num_loads
    mixed = _run(llm, [PROMPTS[0]] * 6, loras * 2)
    assert [o.outputs[0].token_ids for o in mixed] == alone * 2
    assert len(manager.slots) == 2 and len(manager.cpu) == 2
    assert manager.num_loads > loads  # the adapter evicted from host memory was read again


def _broken(src: Path, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def test_bad_adapters_are_refused(llama_lora, tmp_path):
    llm, (a, _, _) = llama_lora
    src = Path(a.lora_path)
    model_path = Path(llm.config.model.path)
    rank_64 = make_test_adapter(model_path, tmp_path / "r64", rank=64)
    config = json.loads((src / "adapter_config.json").read_text())
    lacking = _broken(src, tmp_path / "lacking", lambda d: (d / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["q_proj", "lm_head"]})))
    truncated = _broken(src, tmp_path / "trunc", lambda d: (d / WEIGHTS_FILE).write_bytes(
        (src / WEIGHTS_FILE).read_bytes()[:1000]))
    garbage = _broken(src, tmp_path / "garbage", lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x00" * 7))
    cases = [(rank_64, "max_lora_rank 16"), (lacking, "lm_head"), (truncated, "corrupt"), (garbage, "corrupt"),
             (str(tmp_path / "nowhere"), "adapter_config.json")]
    for i, (path, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            _run(llm, [PROMPTS[1]], [LoRARequest("bad", 50 + i, str(path))])
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(str(model_path), kv_cache_memory=1 << 22).generate("hi", lora_request=a)
    assert _run(llm, [PROMPTS[1]], [a])[0].outputs[0].finish_reason == "length"  # still serving


def test_adapter_failing_in_the_worker_fails_alone(llama_lora, tmp_path):
    """Weights that pass the header checks but hold NaNs: that request errors, the rest run."""
    llm, (a, _, _) = llama_lora

    def nan_weights(d: Path) -> None:
        raw = bytearray((d / WEIGHTS_FILE).read_bytes())
        header = 8 + int.from_bytes(raw[:8], "little")
        raw[header:] = b"\xff" * (len(raw) - header)
        (d / WEIGHTS_FILE).write_bytes(bytes(raw))

    nan = LoRARequest("nan", 77, _broken(Path(a.lora_path), tmp_path / "nan", nan_weights))
    outs = _run(llm, [PROMPTS[0], PROMPTS[0], PROMPTS[0]], [None, nan, a])
    assert outs[1].outputs[0].finish_reason == "error" and "NaN" in outs[1].outputs[0].error
    assert [outs[i].outputs[0].finish_reason for i in (0, 2)] == ["length", "length"]


@pytest.mark.parametrize(("slots", "gathers"), [
    ([0, 0, -1, 1, 1, 1], False),  # each adapter's rows are one run: used in place
    ([2, -1, 0, 0, 2, -1, 1, 0], True),  # scattered (a mixed decode batch): gathered once, grouped by slot
])
def test_torch_path_groups_rows_by_adapter(slots, gathers):
    torch.manual_seed(0)
    x, y = torch.randn(len(slots), 12), torch.randn(len(slots), 10)
    a, b = torch.randn(3, 4, 12), torch.randn(3, 10, 4)
    mapping = LoRAMapping.from_slots(slots, torch.device("cpu"))
    assert (mapping.perm is not None) == gathers
    expected = y.clone()
    for row, slot in enumerate(slots):
        if slot >= 0:
            expected[row] += b[slot] @ (a[slot] @ x[row])
    torch.testing.assert_close(lora_delta_torch(x, y, a, b, mapping), expected)
    assert LoRAMapping.from_slots([-1, -1], torch.device("cpu")) is None
