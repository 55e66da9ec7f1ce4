"""Tensor-parallel ranks agree on which requests fail: a grammar that one rank gives up compiling
(each rank times its own compile) is failed on every rank, so the ranks keep running the same
batch and the other requests get the tokens they get on one rank."""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist
from test_models import run_ranks

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from services.engine.core import EngineCore
from shared.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
CONSTRAINED = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[ab]+"))


def _rank(rank: int, world: int, tmp: str, path: str) -> None:
    from services.worker.model_runner import ModelRunner

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        config = EngineConfig(ModelConfig.from_pretrained(path), CacheConfig(kv_cache_memory=4 << 20),
                              parallel=ParallelConfig(world, rank))
        runner = ModelRunner(config)
        if rank == 1:  # this rank's compiles outlast its timeout, however fast the machine
            from services.worker import grammar_compiler

            compile_now = grammar_compiler._compile
            grammar_compiler._compile = lambda compiler, params: (time.sleep(0.5), compile_now(compiler, params))[1]
            runner.structured.compiler.compile_timeout_s = 0.05
        core = EngineCore(config, runner, runner.num_blocks)
        for req_id, prompt, params in [("greedy", [11, 12, 13], GREEDY), ("constrained", [21, 22], CONSTRAINED)]:
            core.add_request(core.make_request(req_id, prompt, params))
        got: dict[str, list] = {"greedy": [None, [], None], "constrained": [None, [], None]}
        while core.has_unfinished():
            for delta in core.step():
                got[delta.req_id][1] += delta.new_token_ids
                if delta.finish_reason is not None:
                    got[delta.req_id][0], got[delta.req_id][2] = delta.finish_reason, delta.error
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(got, f)
    finally:
        dist.destroy_process_group()


def test_a_compile_timeout_on_one_rank_fails_the_request_on_every_rank(model_dirs, tmp_path):
    path = model_dirs("llama")
    expected = LLM(str(path)).generate({"prompt_token_ids": [11, 12, 13]}, GREEDY, use_tqdm=False)[0].outputs[0]
    run_ranks(_rank, 2, str(tmp_path), str(path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["greedy"] == ["length", expected.token_ids, None]
    reason, tokens, error = results[0]["constrained"]
    assert (reason, tokens) == ("error", []) and "took longer than 0.05s to compile" in error
