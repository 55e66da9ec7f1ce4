"""The decode and verify CUDA-graph paths, checked without CUDA: bucket choice, padding of the
static buffers, when graphs are used, and the whole padded decode and verify paths through the
Triton kernels (in Triton's interpreter on CPU) with a stand-in for capture and replay. tests/test_gpu_path.py
replays real graphs when a GPU is present."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from pagedserve import LLM, SamplingParams
from services.worker.cuda_graphs import (
    DecodeBuffers,
    DecodeGraphs,
    block_table_rows,
    bucket_for,
    capture_sizes,
    graphs_unsupported,
    padded_seq_lens,
)
from services.worker.input_batch import StepInputs
from services.worker.layers.attention import CommonAttentionMetadata
from shared.config import CompilationConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shared.speculative import SpeculativeConfig


@pytest.mark.parametrize(
    "max_batch,limit,expected",
    [
        (1, 256, [1]),
        (3, 256, [1, 2, 3]),
        (8, 256, [1, 2, 4, 8]),
        (20, 256, [1, 2, 4, 8, 16, 20]),
        (128, 256, [1, 2, 4, *range(8, 129, 8)]),
        (1000, 256, [1, 2, 4, *range(8, 257, 8)]),
        (64, 10, [1, 2, 4, 8, 10]),
    ],
)
def test_capture_sizes(max_batch, limit, expected):
    assert capture_sizes(max_batch, limit) == expected


def test_bucket_for_picks_the_smallest_bucket_that_fits():
    sizes = capture_sizes(128, 256)
    for batch in range(1, 129):
        bucket = bucket_for(sizes, batch)
        assert bucket >= batch and bucket in sizes
        assert all(s < batch for s in sizes if s < bucket)
    assert [bucket_for(sizes, b) for b in (1, 3, 5, 9, 17, 127)] == [1, 4, 8, 16, 24, 128]
    assert bucket_for(sizes, 129) is None


def test_padding_helpers():
    assert padded_seq_lens([5, 9], 4).tolist() == [5, 9, 0, 0]
    assert padded_seq_lens([5, 9], 4).dtype == "int32"
    rows = block_table_rows([[3], [4, 5, 6], []], width=8)
    assert rows.tolist() == [[3, 0, 0], [4, 5, 6], [0, 0, 0]] and rows.dtype == "int32"
    assert block_table_rows([[1, 2, 3, 4]], width=2).tolist() == [[1, 2]]  # never wider than the buffer


@pytest.fixture(scope="module")
def config(model_dirs) -> EngineConfig:
    model = ModelConfig.from_pretrained(str(model_dirs("llama")), max_model_len=100)
    return EngineConfig(model=model, scheduler=SchedulerConfig(max_num_seqs=8))


def test_graphs_only_on_cuda_with_triton_one_rank_and_not_eager(config):
    cuda, triton = torch.device("cuda"), SimpleNamespace(name="triton")
    assert graphs_unsupported(config, cuda, triton) is None
    eager = dataclasses.replace(config, compilation=CompilationConfig(enforce_eager=True))
    assert "enforce_eager" in graphs_unsupported(eager, cuda, triton)
    assert "not CUDA" in graphs_unsupported(config, torch.device("cpu"), triton)
    assert "torch attention backend" in graphs_unsupported(config, cuda, SimpleNamespace(name="torch"))
    tp2 = dataclasses.replace(config, parallel=ParallelConfig(tensor_parallel_size=2))
    assert "tensor and pipeline parallel" in graphs_unsupported(tp2, cuda, triton)
    with pytest.raises(ValueError, match="max_capture_size"):
        CompilationConfig(max_capture_size=0)


def _decode_inputs(seq_lens: list[int], block_size: int = 16) -> StepInputs:
    tables = [[10 * i + j for j in range(-(-n // block_size))] for i, n in enumerate(seq_lens)]
    slots = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, seq_lens)]
    batch = len(seq_lens)
    attn = CommonAttentionMetadata(
        list(range(batch + 1)), seq_lens, tables, torch.tensor(slots), batch, block_size, torch.device("cpu")
    )
    ids = torch.arange(100, 100 + batch)
    return StepInputs(ids, torch.tensor(seq_lens) - 1, attn, torch.arange(batch), [])


def test_bucket_only_for_decode_only_steps(config):
    graphs = DecodeGraphs(config, SimpleNamespace(name="triton"), torch.device("cpu"))
    assert graphs.sizes == {1: [1, 2, 4, 8]}
    assert graphs.bucket(_decode_inputs([5, 7, 9]).attn) == (4, 1)
    assert graphs.bucket(_decode_inputs([5] * 8).attn) == (8, 1)
    assert graphs.bucket(_decode_inputs([5] * 9).attn) is None  # above the largest bucket
    assert graphs.bucket(_decode_inputs([101]).attn) is None  # longer than max_model_len
    mixed = dataclasses.replace(_decode_inputs([5, 7]).attn, query_start_loc=[0, 1, 4], num_decodes=1)
    assert graphs.bucket(mixed) is None
    assert graphs.bucket(dataclasses.replace(mixed, num_decodes=0)) is None


def test_verify_steps_take_the_graphs_of_their_tokens_per_request(config):
    spec = dataclasses.replace(config, speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3),
                               scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=20))
    graphs = DecodeGraphs(spec, SimpleNamespace(name="triton"), torch.device("cpu"))
    assert graphs.sizes == {1: [1, 2, 4, 8], 4: [1, 2, 4, 5]}  # 5 requests of 4 tokens fill the budget
    assert graphs.buffers.input_ids.shape == (20,) and graphs.buffers.seq_lens.shape == (8,)
    decode = _decode_inputs([5, 7, 9]).attn
    assert graphs.bucket(decode) == (4, 1)
    verify = dataclasses.replace(decode, query_start_loc=[0, 1, 5, 7], num_decodes=1)
    assert graphs.bucket(verify) == (4, 4)
    assert graphs.bucket(dataclasses.replace(decode, query_start_loc=[0, 1, 6, 8], num_decodes=1)) is None  # 5 > q
    six = _decode_inputs([5] * 6).attn
    assert graphs.bucket(dataclasses.replace(six, query_start_loc=[0, 2, 3, 4, 5, 6, 7], num_decodes=5)) is None
    assert graphs.bucket(six) == (8, 1)


def test_verify_buffers_pad_requests_and_tokens():
    buffers = DecodeBuffers(max_batch=4, max_model_len=100, block_size=16, device=torch.device("cpu"), max_tokens=12)
    inputs = _decode_inputs([20, 40])
    attn = dataclasses.replace(inputs.attn, query_start_loc=[0, 1, 4], num_decodes=1,
                               slot_mapping=torch.tensor([19, 175, 176, 177]))
    inputs = dataclasses.replace(inputs, input_ids=torch.arange(100, 104), positions=torch.tensor([19, 37, 38, 39]),
                                 attn=attn)
    buffers.load(inputs, size=4, q=3)
    assert buffers.slot_mapping.tolist() == [19, 175, 176, 177] + [-1] * 8
    assert buffers.query_start_loc.tolist() == [0, 1, 4, 4, 4]  # padding requests own no tokens
    assert buffers.seq_lens.tolist() == [20, 40, 0, 0]
    assert buffers.input_ids[:4].tolist() == [100, 101, 102, 103]


def test_buffers_pad_and_forget_stale_rows():
    buffers = DecodeBuffers(max_batch=8, max_model_len=100, block_size=16, device=torch.device("cpu"))
    assert buffers.block_tables.shape == (8, 7)
    buffers.load(_decode_inputs([20, 40, 60, 80]), size=4)
    buffers.load(_decode_inputs([33, 17, 50]), size=4)  # one request fewer: row 3 becomes padding
    assert buffers.slot_mapping[:4].tolist() == [32, 176, 369, -1]  # a stale slot would overwrite KV
    assert buffers.seq_lens[:4].tolist() == [33, 17, 50, 0]
    assert buffers.input_ids[:3].tolist() == [100, 101, 102]
    assert buffers.positions[:3].tolist() == [32, 16, 49]
    assert buffers.block_tables[:3, :4].tolist() == [[0, 1, 2, 0], [10, 11, 0, 0], [20, 21, 22, 23]]
    assert buffers.slot_mapping[4:].tolist() == [-1] * 4 and buffers.seq_lens[4:].tolist() == [0] * 4


class _EagerGraph:
    """Stands in for a captured graph: replay() runs the same padded forward eagerly into its output."""

    def __init__(self, forward, out: torch.Tensor):
        self.forward, self.out = forward, out

    def replay(self) -> None:
        self.out.copy_(self.forward())


class EagerReplayGraphs(DecodeGraphs):
    """DecodeGraphs with the capture replaced by _EagerGraph, so the path runs on CPU."""

    splits = 1

    def num_splits(self, size: int) -> int:
        return self.splits

    def _capture_one(self, model, kv_caches, size, q):
        def forward():
            return self.buffers.forward(model, self.backend, kv_caches, size, self.num_splits(size), q)

        out = forward()
        return _EagerGraph(forward, out), out

    def run(self, inputs):
        self.used.append((self.bucket(inputs.attn), inputs.attn.num_reqs))
        return super().run(inputs)


def eager_then_padded(llm: LLM, prompts: list[dict], params: list[SamplingParams], splits: int = 1) -> EagerReplayGraphs:
    """Run the prompts eagerly, then through EagerReplayGraphs installed on the runner: the same
    tokens and logprobs. Returns the graphs (what they replayed)."""
    runner = llm.runner
    eager = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    graphs = EagerReplayGraphs(llm.config, runner.backend, runner.device)
    graphs.splits, graphs.used = splits, []
    graphs.capture(runner.model, runner.kv_caches)
    runner.decode_graphs = graphs
    padded = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [c.token_ids for c in padded] == [c.token_ids for c in eager]
    for got, want in zip(padded, eager):
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, rel=1e-5, abs=1e-5)
    return graphs


@pytest.mark.parametrize("splits", [1, 3])
def test_padded_decode_path_gives_the_eager_tokens(model_dirs, monkeypatch, splits):
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "triton")  # interpreted on CPU (tests/conftest.py)
    # a short context: the interpreted kernels walk every block a captured batch may read
    llm = LLM(str(model_dirs("llama")), max_num_seqs=8, max_model_len=64, enable_prefix_caching=False,
              enforce_eager=True)
    runner = llm.runner
    assert runner.decode_graphs is None and runner.backend.name == "triton"
    vocab = llm.config.model.vocab_size
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % (vocab - 20) + 10 for j in range(4 + 3 * i)]} for i in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + 2 * i, ignore_eos=True, logprobs=0) for i in range(5)]
    graphs = eager_then_padded(llm, prompts, params, splits)
    # batches 5 -> 1 as requests finish: padded buckets, and a bucket reused with a stale row
    assert graphs.replays == 9
    assert {((8, 1), 5), ((4, 1), 4), ((4, 1), 3), ((2, 1), 2), ((1, 1), 1)} <= set(graphs.used)


def test_padded_verify_path_gives_the_eager_tokens(model_dirs, monkeypatch):
    """Speculative decoding (prompt lookup over looping outputs) through the verify graphs: the
    same tokens and logprobs as the eager steps, with proposals verified in padded buckets."""
    path = str(model_dirs("llama", attention_scale=0.005))
    # greedy outputs of this model fall into loops within 15-30 tokens: prompts that end in one
    # (found with the torch backend, quickly) keep looping, which prompt lookup follows
    starts = [[(5 * i + 3 * j) % 1000 + 10 for j in range(4 + 2 * i)] for i in range(3)]
    looped = LLM(path, max_model_len=64).generate([{"prompt_token_ids": p} for p in starts],
                                                   SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    prompts = [{"prompt_token_ids": p + list(o.outputs[0].token_ids)} for p, o in zip(starts, looped)]
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 2 * i, ignore_eos=True, logprobs=0) for i in range(3)]
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "triton")
    llm = LLM(path, max_num_seqs=4, max_model_len=64, enable_prefix_caching=False, enforce_eager=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    graphs = eager_then_padded(llm, prompts, params)
    verified = [(shape, batch) for shape, batch in graphs.used if shape is not None and shape[1] == 4]
    assert len(verified) >= 3 and llm.engine.scheduler.spec.num_accepted_tokens >= 12  # over both runs
    assert any(shape[0] > batch for shape, batch in verified)  # a bucket with padding requests


def test_enforce_eager_flag_reaches_the_config(model_dirs):
    from pagedserve.serve import _forward
    from shared.engine_args import add_model_args, engine_config_from_args

    path = str(model_dirs("llama"))
    llm = LLM(path, enforce_eager=True)
    assert llm.config.compilation.enforce_eager and llm.runner.decode_graphs is None
    out = llm.generate({"prompt_token_ids": [11, 12, 13]}, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    del llm
    assert not CompilationConfig().enforce_eager  # graphs by default (used on CUDA only)

    import argparse

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--model", path, "--enforce-eager"])
    assert engine_config_from_args(args).compilation.enforce_eager
    assert "--enforce-eager" in _forward(args)  # `pagedserve serve` passes it on to the workers
    args = parser.parse_args(["--model", path])
    assert not engine_config_from_args(args).compilation.enforce_eager
    assert "--no-enforce-eager" in _forward(args)
