"""Model parity with transformers for every architecture (float32, CPU): one prompt, prompts of
different lengths flattened into one forward, and chunked prefill mixed with decodes over the
paged KV cache. Also bfloat16, opt's post-norm layout, the rope, and tensor parallelism over gloo.
Checkpoint loading (sharded checkpoints, clear errors, dtypes, the tokenizer) is in
test_model_loader.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from pagedserve.test_model import ARCHS
from services.worker.forward_context import ForwardContext, set_forward_context
from services.worker.layers.attention import Attention
from services.worker.layers.attention_backend import CommonAttentionMetadata
from services.worker.layers.attention_torch import TorchAttentionBackend
from services.worker.layers.attention_triton import TritonAttentionBackend
from services.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from services.worker.layers.rotary import inverse_frequencies, rope_parameters
from services.worker.loader import build_model
from shared.config import ModelConfig

BLOCK = 8
NUM_BLOCKS = 12
TOL = {"atol": 1e-4, "rtol": 1e-4}


@dataclass
class Chunk:
    tokens: list[int]  # this step's new tokens of one request
    start: int  # tokens of the request already in the cache
    blocks: list[int]


_MODELS: dict[Path, tuple] = {}


def load(path: Path):
    """(our model, its ModelConfig, the transformers model), cached per checkpoint."""
    if path not in _MODELS:
        config = ModelConfig.from_pretrained(str(path))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        _MODELS[path] = (build_model(config, torch.float32, "cpu"), config, hf)
    return _MODELS[path]


def kv_caches(model, config: ModelConfig) -> list[torch.Tensor]:
    attn = next(m for m in model.modules() if isinstance(m, Attention))  # this rank's KV heads
    shape = (2, NUM_BLOCKS, BLOCK, attn.num_kv_heads, attn.head_dim)
    return [torch.zeros(shape) for _ in range(config.num_layers)]


def run_step(
    model, caches: list[torch.Tensor], chunks: list[Chunk], num_decodes: int = 0, backend_name: str = "torch"
) -> list[torch.Tensor]:
    """One forward over the flattened chunks (decodes first); the logits of each chunk's tokens.
    backend_name "triton" runs every Triton kernel (attention, RMSNorm, rotary, SiLU-and-mul) in
    the interpreter on CPU, natively on CUDA."""
    ids, positions, slots, starts = [], [], [], [0]
    for c in chunks:
        pos = range(c.start, c.start + len(c.tokens))
        ids += c.tokens
        positions += pos
        slots += [c.blocks[p // BLOCK] * BLOCK + p % BLOCK for p in pos]
        starts.append(len(ids))
    common = CommonAttentionMetadata(
        query_start_loc=starts,
        seq_lens=[c.start + len(c.tokens) for c in chunks],
        block_tables=[c.blocks for c in chunks],
        slot_mapping=torch.tensor(slots),
        num_decodes=num_decodes,
        block_size=BLOCK,
        device=torch.device("cpu"),
    )
    backend = TorchAttentionBackend(caches[0].dtype) if backend_name == "torch" else TritonAttentionBackend("cpu")
    with torch.inference_mode(), set_forward_context(ForwardContext(backend, backend.build(common), caches)):
        logits = model.compute_logits(model(torch.tensor(ids), torch.tensor(positions)))
    assert logits.dtype == torch.float32
    return list(logits.split([len(c.tokens) for c in chunks]))


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([tokens])).logits[0]


def prompt(config: ModelConfig, n: int, seed: int) -> list[int]:
    return torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(model_dirs, arch):
    model, config, hf = load(model_dirs(arch))
    tokens = prompt(config, 13, seed=1)
    (logits,) = run_step(model, kv_caches(model, config), [Chunk(tokens, 0, [3, 1])])
    torch.testing.assert_close(logits, hf_logits(hf, tokens), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_prefill_matches_transformers(model_dirs, arch):
    model, config, hf = load(model_dirs(arch))
    a, b = prompt(config, 11, seed=2), prompt(config, 6, seed=3)
    out = run_step(model, kv_caches(model, config), [Chunk(a, 0, [4, 0]), Chunk(b, 0, [7])])
    torch.testing.assert_close(out[0], hf_logits(hf, a), **TOL)
    torch.testing.assert_close(out[1], hf_logits(hf, b), **TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_and_decode_match_transformers(model_dirs, arch, backend):
    """A prefills, then decodes while B prefills in two chunks beside it, then both decode."""
    model, config, hf = load(model_dirs(arch))
    caches = kv_caches(model, config)
    seqs = {"a": prompt(config, 10, seed=4), "b": prompt(config, 12, seed=5)}
    blocks = {"a": [5, 2], "b": [9, 1]}
    logits: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def step(plan: list[tuple[str, int, int]], num_decodes: int) -> None:
        chunks = [Chunk(seqs[r][lo:hi], lo, blocks[r]) for r, lo, hi in plan]
        for (r, _, hi), out in zip(plan, run_step(model, caches, chunks, num_decodes, backend)):
            logits[r].append(out)
            if hi == len(seqs[r]):  # the request's last known token: sample greedily
                seqs[r].append(int(out[-1].argmax()))

    step([("a", 0, 10)], 0)
    step([("a", 10, 11), ("b", 0, 7)], 1)
    step([("a", 11, 12), ("b", 7, 12)], 1)
    for n in range(2):
        step([("a", 12 + n, 13 + n), ("b", 12 + n, 13 + n)], 2)
    for r in ("a", "b"):
        ours = torch.cat(logits[r])
        torch.testing.assert_close(ours, hf_logits(hf, seqs[r][: len(ours)]), **TOL)


def test_bfloat16_prefill_and_decode_track_float32(model_dirs):
    """--dtype bfloat16 runs on any CPU (natively with AVX512-BF16 or AMX, emulated elsewhere): a
    prefill and decodes over a bf16 paged cache stay within bf16 rounding of transformers' float32."""
    path = model_dirs("llama")
    config = ModelConfig.from_pretrained(str(path), dtype="bfloat16")
    model, hf = build_model(config, torch.bfloat16, "cpu"), load(path)[2]
    caches = [c.to(torch.bfloat16) for c in kv_caches(model, config)]
    tokens = prompt(config, 12, seed=6)
    outs = run_step(model, caches, [Chunk(tokens[:10], 0, [2, 5])])
    outs += run_step(model, caches, [Chunk(tokens[10:11], 10, [2, 5])], num_decodes=1)
    outs += run_step(model, caches, [Chunk(tokens[11:12], 11, [2, 5])], num_decodes=1)
    ours, want = torch.cat(outs), hf_logits(hf, tokens)
    assert caches[0].dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    assert (ours - want).abs().max() <= 0.05 * want.abs().max()
    assert (ours.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


def test_opt_post_norm_with_projections_matches_transformers(model_dirs):
    """opt-350m's layout: LayerNorm after each block, embeddings narrower than hidden_size."""
    path = model_dirs("opt", config_overrides={"do_layer_norm_before": False, "word_embed_proj_dim": 32})
    model, config, hf = load(path)
    tokens = prompt(config, 9, seed=6)
    (logits,) = run_step(model, kv_caches(model, config), [Chunk(tokens, 0, [2, 6])])
    torch.testing.assert_close(logits, hf_logits(hf, tokens), **TOL)


def test_llama3_rope_matches_transformers(model_dirs):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = model_dirs("llama")
    config = ModelConfig.from_pretrained(str(path))
    params = rope_parameters(config.hf_config)
    assert params["rope_type"] == "llama3"
    expected, scaling = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(path), torch.device("cpu"))
    assert scaling == 1.0
    torch.testing.assert_close(inverse_frequencies(config.head_dim, params), expected)
    legacy = {"rope_theta": params["rope_theta"], "rope_scaling": {**params, "type": "llama3"}}
    del legacy["rope_scaling"]["rope_type"], legacy["rope_scaling"]["rope_theta"]
    assert rope_parameters(legacy) == {**params, "type": "llama3"}


def _tp_model_worker(rank: int, world: int, tmp: str, path: str, tokens: list[int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        config = ModelConfig.from_pretrained(path)
        model = build_model(config, torch.float32, "cpu")
        (logits,) = run_step(model, kv_caches(model, config), [Chunk(tokens, 0, [3, 1])])
        if rank == 0:
            torch.save(logits, f"{tmp}/logits.pt")
    finally:
        dist.destroy_process_group()


def _tp_vocab_worker(rank: int, world: int, tmp: str, weight: torch.Tensor, ids: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        embed = VocabParallelEmbedding(*weight.shape)
        embed.weight.weight_loader(embed.weight, weight)
        head = ParallelLMHead(*weight.shape)
        head.tie(embed)
        hidden = embed(ids)
        logits = head(hidden)  # a collective: every rank computes it
        if rank == 0:
            torch.save((hidden, logits), f"{tmp}/out.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world: int, *args) -> None:
    # fork: the children inherit the imported modules (spawn re-imports torch and transformers
    # per rank, ~10x slower); they run single-threaded, so no OpenMP pool crosses the fork.
    mp.start_processes(worker, args=(world, *args), nprocs=world, start_method="fork")


# llama at 4 ranks has 2 KV heads for 4 ranks: each KV head is replicated on two ranks
@pytest.mark.parametrize(
    ("arch", "world"), [("qwen2", 2), ("llama", 4), ("qwen3", 2), ("opt", 4), ("mixtral", 2), ("qwen3_moe", 2)]
)
def test_tensor_parallel_matches_one_rank(model_dirs, tmp_path, arch, world):
    path = model_dirs(arch)
    model, config, _ = load(path)
    tokens = prompt(config, 13, seed=7)
    (expected,) = run_step(model, kv_caches(model, config), [Chunk(tokens, 0, [3, 1])])
    run_ranks(_tp_model_worker, world, str(tmp_path), str(path), tokens)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, **TOL)


def test_vocab_parallel_pads_an_uneven_vocabulary(tmp_path):
    weight = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))  # 3 ranks of 4 rows, 2 padding
    ids = torch.tensor([9, 0, 4, 3, 8, 7])
    run_ranks(_tp_vocab_worker, 3, str(tmp_path), weight, ids)
    hidden, logits = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(hidden, weight[ids])
    torch.testing.assert_close(logits, hidden @ weight.T)
