"""LoRA under tensor parallelism: adapters are sharded like their base layers (A whole and B by
output rows in column-parallel layers, A by input columns in row-parallel ones, whose partial
deltas the layer's all-reduce sums), so four ranks (each KV head replicated on two) give the tokens one process gives."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from test_models import run_ranks

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.test_lora import make_test_adapters
from services.engine.core import EngineCore
from shared.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, ParallelConfig

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = [11, 12, 13, 14, 15]


def _rank(rank: int, world: int, tmp: str, path: str, adapters: list[str]) -> None:
    from services.worker.model_runner import ModelRunner

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        config = EngineConfig(ModelConfig.from_pretrained(path), CacheConfig(kv_cache_memory=4 << 20),
                              parallel=ParallelConfig(world, rank), lora=LoRAConfig(max_loras=2))
        runner = ModelRunner(config)
        core = EngineCore(config, runner, runner.num_blocks)
        loras = [None] + [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(adapters)]
        for i, lora in enumerate(loras):
            core.add_request(core.make_request(str(i), PROMPT, GREEDY, lora_request=lora))
        got: dict[str, list[int]] = {str(i): [] for i in range(len(loras))}
        while core.has_unfinished():
            for delta in core.step():
                got[delta.req_id] += delta.new_token_ids
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(got, f)
    finally:
        dist.destroy_process_group()


def test_ranks_give_the_tokens_of_one_process(model_dirs, tmp_path):
    path = model_dirs("llama")
    adapters = [str(p) for p in make_test_adapters(path, 2, out_dir=tmp_path / "adapters")]
    loras = [None] + [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(adapters)]
    llm = LLM(str(path), enable_lora=True, max_loras=2, kv_cache_memory=4 << 20)
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 3, GREEDY, use_tqdm=False, lora_request=loras)
    expected = {str(i): o.outputs[0].token_ids for i, o in enumerate(outs)}
    assert len({tuple(t) for t in expected.values()}) == 3  # the adapters change the tokens
    run_ranks(_rank, 4, str(tmp_path), str(path), adapters)  # 2 KV heads on 4 ranks: each replicated twice
    for r in range(4):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == expected
