"""GPTQ and AWQ checkpoints, written by make-test-model's quantizer in each documented layout: the
packing is checked against a reference dequantization written from the formats' descriptions
(bit by bit, not through pagedserve's unpacking), and the quantized checkpoint decodes exactly like
a float checkpoint holding those reference weights. Unsupported configs and corrupt tensors fail
at startup, naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from test_models import run_ranks

from pagedserve import LLM, SamplingParams
from pagedserve.test_quant_model import quantize_checkpoint

PROMPTS = [{"prompt_token_ids": [(5 * i + 11 * j) % 1000 + 10 for j in range(18 + 5 * i)]} for i in range(3)]
GREEDY = SamplingParams(max_tokens=10, temperature=0, logprobs=1)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # word position j holds column AWQ_ORDER[j] of its eight
CASES = {"gptq": "qwen2", "gptq-act-order": "llama", "gptq-8bit": "qwen2", "awq": "llama"}


def _field(word: int, position: int, bits: int) -> int:
    return ((word & 0xFFFFFFFF) >> (bits * position)) & ((1 << bits) - 1)


def reference_gptq(t: dict, bits: int) -> torch.Tensor:
    """W[n, k] = scales[g, n] * (q[k, n] - (z[g, n] + 1)), g = g_idx[k]: q packed 32/bits per word
    down the input dimension, z across the output dimension, both from the low bits up."""
    per = 32 // bits
    qweight, qzeros, scales, g_idx = (t[s].tolist() for s in ("qweight", "qzeros", "scales", "g_idx"))
    k_size, n_size = len(qweight) * per, len(qweight[0])
    return torch.tensor([[scales[g_idx[k]][n] * (_field(qweight[k // per][n], k % per, bits)
                                                 - _field(qzeros[g_idx[k]][n // per], n % per, bits) - 1)
                          for k in range(k_size)] for n in range(n_size)], dtype=torch.float32)


def reference_awq(t: dict, group_size: int) -> torch.Tensor:
    """W[n, k] = (q[k, n] - z[g, n]) * scales[g, n], g = k // group_size: q and z packed eight per
    word across the output dimension, column c at word position AWQ_ORDER.index(c % 8)."""
    qweight, qzeros, scales = (t[s].tolist() for s in ("qweight", "qzeros", "scales"))
    k_size, n_size = len(qweight), len(qweight[0]) * 8
    pos = [AWQ_ORDER.index(c) for c in range(8)]
    return torch.tensor([[scales[k // group_size][n] * (_field(qweight[k][n // 8], pos[n % 8], 4)
                                                        - _field(qzeros[k // group_size][n // 8], pos[n % 8], 4))
                          for k in range(k_size)] for n in range(n_size)], dtype=torch.float32)


def _reference(scheme: str, tensors: dict, config: dict) -> torch.Tensor:
    if scheme == "awq":
        return reference_awq(tensors, config["group_size"])
    return reference_gptq(tensors, config["bits"])


def _dequantized_checkpoint(quantized, base, dst, scheme: str):
    """A float checkpoint whose projections hold the reference dequantization of `quantized`'s."""
    shutil.copytree(base, dst)
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    packed = load_file(quantized / "model.safetensors")
    full = load_file(base / "model.safetensors")
    for name in [n for n in packed if n.endswith(".qweight")]:
        prefix = name.removesuffix("qweight")
        tensors = {s: packed[prefix + s] for s in ("qweight", "qzeros", "scales", "g_idx") if prefix + s in packed}
        full[prefix + "weight"] = _reference(scheme, tensors, config)
    save_file(full, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def checkpoints(model_dirs, tmp_path_factory):
    built = {}
    for scheme, arch in CASES.items():
        base = model_dirs(arch)
        root = tmp_path_factory.mktemp(scheme)
        quantized = quantize_checkpoint(base, root / "quantized", scheme)
        built[scheme] = base, quantized, _dequantized_checkpoint(quantized, base, root / "reference", scheme)
    return built


@pytest.mark.parametrize("scheme", list(CASES))
def test_the_layout_dequantizes_close_to_the_weights(checkpoints, scheme):
    base, quantized, reference = checkpoints[scheme]
    packed, full, ref = (load_file(path / "model.safetensors") for path in (quantized, base, reference))
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == scheme.split("-")[0]
    prefix = "model.layers.1.self_attn.k_proj."
    assert packed[prefix + "qweight"].dtype == torch.int32 and packed[prefix + "scales"].dtype == torch.float16
    weight, dequantized = full[prefix + "weight"], ref[prefix + "weight"]
    step = packed[prefix + "scales"].float().abs().max()
    # round to nearest: within a step of the float weight (a misread field is off by many steps)
    assert (dequantized - weight).abs().max() <= step * 1.01
    assert (dequantized - weight).abs().mean() <= step * 0.3
    assert "model.embed_tokens.weight" in packed and packed["model.embed_tokens.weight"].dtype == weight.dtype


@pytest.fixture(scope="module")
def quantized_outputs(checkpoints) -> dict[str, tuple[str | None, list]]:
    """Each quantized checkpoint's quantization as loaded, and its greedy outputs, decoded once in
    this process (one rank)."""
    outputs = {}
    for scheme, (_, quantized, _) in checkpoints.items():
        llm = LLM(str(quantized), kv_cache_memory=1 << 20)
        outputs[scheme] = llm.config.model.quantization, llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return outputs


@pytest.mark.parametrize("scheme", list(CASES))
def test_decodes_like_the_reference_dequantized_weights(checkpoints, quantized_outputs, scheme):
    quantization, got = quantized_outputs[scheme]
    assert quantization == scheme.split("-")[0]
    want = LLM(str(checkpoints[scheme][2]), kv_cache_memory=1 << 20).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for a, b in zip(got, want):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)


def _tp_rank(rank: int, world: int, tmp: str, paths: dict[str, str]) -> None:
    from services.engine.core import EngineCore
    from services.worker.model_runner import ModelRunner
    from shared.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        got: dict[str, list[list[int]]] = {}
        for scheme, path in paths.items():
            config = EngineConfig(ModelConfig.from_pretrained(path), CacheConfig(kv_cache_memory=1 << 20),
                                  parallel=ParallelConfig(world, rank))
            runner = ModelRunner(config)
            core = EngineCore(config, runner, runner.num_blocks)
            for i, p in enumerate(PROMPTS):
                core.add_request(core.make_request(str(i), p["prompt_token_ids"], GREEDY))
            tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
            while core.has_unfinished():
                for delta in core.step():
                    tokens[delta.req_id] += delta.new_token_ids
            got[scheme] = [tokens[str(i)] for i in range(len(PROMPTS))]
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(got, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_tokens_of_one_process(checkpoints, quantized_outputs, tmp_path):
    """Column-parallel layers split the codes, zeros and scales by output rows; row-parallel ones
    split the codes and g_idx by input columns and keep every group (act-order and AWQ's groups)."""
    paths = {scheme: str(checkpoints[scheme][1]) for scheme in ("gptq-act-order", "awq")}
    expected = {scheme: [o.outputs[0].token_ids for o in quantized_outputs[scheme][1]] for scheme in paths}
    run_ranks(_tp_rank, 2, str(tmp_path), paths)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def _edited(checkpoints, tmp_path, scheme, config_change=None, tensor_change=None):
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints[scheme][1], path)
    if config_change:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"].update(config_change)
        (path / "config.json").write_text(json.dumps(config))
    if tensor_change:
        tensors = load_file(path / "model.safetensors")
        tensors.update(tensor_change(tensors))
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


G_IDX = "model.layers.0.self_attn.q_proj.g_idx"


@pytest.mark.parametrize(("scheme", "config_change", "tensor_change", "message"), [
    ("gptq", {"bits": 3}, None, r"gptq with bits=3 is not supported; supported: \(4, 8\)"),
    ("gptq", {"checkpoint_format": "marlin"}, None, "gptq checkpoint_format 'marlin' is not supported"),
    ("gptq", {"lm_head": True}, None, "quantized LM head"),
    ("gptq", {"group_size": 0}, None, "group_size must be a positive integer or -1"),
    ("gptq", {"group_size": 48}, None, "not a multiple of the group size 48"),
    ("awq", {"version": "gemv"}, None, "awq version 'gemv' is not supported"),
    ("awq", {"bits": 8}, None, "awq with bits=8 is not supported"),
    ("awq", {"modules_to_not_convert": ["mlp"]}, None, r"modules_to_not_convert \['mlp'\]"),
    ("gptq", None, lambda t: {G_IDX: t[G_IDX] + 5}, "g_idx names groups outside"),
    ("gptq", None, lambda t: {G_IDX: t[G_IDX].flip(0)}, "fused projections' g_idx differ"),
    ("gptq", None, lambda t: {"model.layers.0.mlp.up_proj.qweight": t["model.layers.0.mlp.up_proj.qweight"].float()},
     "up_proj.qweight.*packed weights must be int32"),
])
def test_bad_checkpoints_fail_naming_the_problem(checkpoints, tmp_path, scheme, config_change, tensor_change, message):
    path = _edited(checkpoints, tmp_path, scheme, config_change, tensor_change)
    with pytest.raises(ValueError, match=message):
        LLM(str(path), kv_cache_memory=1 << 20)


def test_asking_for_another_quantization_is_an_error(checkpoints):
    with pytest.raises(ValueError, match="quantization awq was asked for, but the checkpoint is quantized with gptq"):
        LLM(str(checkpoints["gptq"][1]), quantization="awq")


def test_quantized_moe_experts_fail_at_startup_naming_scheme_and_device(model_dirs):
    with pytest.raises(ValueError, match=r"quantization int8 of MoE experts \(MixtralForCausalLM\) is not supported on cpu"):
        LLM(str(model_dirs("mixtral")), quantization="int8", kv_cache_memory=1 << 20)
