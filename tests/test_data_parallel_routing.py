"""The data-parallel router's choices (services/frontend/routing.py), on the loads replicas report:
a shared prefix sticks to one replica unless it is much more loaded, new prefixes spread, a
replica that is down gets nothing, round robin takes turns; and the router's block hashes are
the ones the engine's prefix cache indexes. Then what the frontend makes of its replicas' reports:
the summed load /metrics exports, and which replicas are up."""

from __future__ import annotations

import re
import time

import pytest

from services.engine.kv_cache_manager import KVCacheManager
from services.engine.request import Request
from services.frontend.engine_client import EngineClient
from services.frontend.replicas import EngineReplicas
from services.frontend.routing import AffinityRouter, ReplicaLoad, RoundRobinRouter, make_router
from services.frontend.state import FrontendConfig
from shared.lora import LoRARequest
from shared.protocol import ModelInfo, Pong
from shared.sampling_params import SamplingParams

BS = 4
ADAPTER_A, ADAPTER_B = LoRARequest("a", 1, "/adapters/a"), LoRARequest("b", 2, "/adapters/b")
IDLE = [ReplicaLoad(True, 0), ReplicaLoad(True, 0)]


def prompt(prefix: int, user: int, blocks: int = 3) -> list[int]:
    return [prefix * 100 + i for i in range(blocks * BS)] + [7000 + user, 7001 + user]


def test_a_shared_prefix_sticks_to_one_replica_and_new_prefixes_spread():
    router = AffinityRouter()
    first = {p: router.pick(prompt(p, 0), BS, IDLE) for p in range(4)}
    assert all(reason == "load" for _, reason in first.values())
    assert sorted(i for i, _ in first.values()) == [0, 0, 1, 1]  # equal loads: new prefixes alternate
    for user in range(1, 6):
        for p in range(4):
            assert router.pick(prompt(p, user), BS, IDLE) == (first[p][0], "affinity")


def test_the_longest_matching_run_of_blocks_wins():
    router = AffinityRouter()
    a, _ = router.pick(prompt(1, 0, blocks=1), BS, IDLE)  # one block of prefix 1
    b, _ = router.pick(prompt(1, 0, blocks=3), BS, [ReplicaLoad(True, 0 if i != a else 3) for i in range(2)])
    assert b == a  # its first block is there, 3 requests ahead is not "much more loaded"
    # the replica that has all three blocks wins over one with only the first
    router.pick(prompt(1, 9, blocks=1), BS, [ReplicaLoad(i != a, 0) for i in range(2)])  # the other gets block 0 too
    assert router.pick(prompt(1, 5, blocks=3), BS, IDLE) == (a, "affinity")


@pytest.mark.parametrize(("load", "expected"), [(4, "affinity"), (5, "load")])
def test_affinity_yields_to_load_only_when_much_more_loaded(load, expected):
    router = AffinityRouter(load_slack=4)
    home, _ = router.pick(prompt(3, 0), BS, IDLE)
    loads = [ReplicaLoad(True, load if i == home else 0) for i in range(2)]
    chosen, reason = router.pick(prompt(3, 1), BS, loads)
    assert reason == expected and (chosen == home) == (expected == "affinity")


def test_much_more_loaded_is_relative_to_the_least_loaded():
    router = AffinityRouter(load_slack=4)
    home, _ = router.pick(prompt(3, 0), BS, IDLE)
    other = 1 - home
    busy = [ReplicaLoad(True, 19 if i == home else 10) for i in range(2)]  # under twice the other's
    assert router.pick(prompt(3, 1), BS, busy) == (home, "affinity")
    busier = [ReplicaLoad(True, 21 if i == home else 10) for i in range(2)]
    assert router.pick(prompt(3, 2), BS, busier) == (other, "load")


def test_a_replica_that_is_down_gets_nothing_and_all_down_still_routes():
    router = AffinityRouter()
    home, _ = router.pick(prompt(5, 0), BS, IDLE)
    down = [ReplicaLoad(i != home, 0) for i in range(2)]
    assert router.pick(prompt(5, 1), BS, down) == (1 - home, "load")
    # now both replicas were sent the prefix; with both down the request still goes somewhere
    assert router.pick(prompt(5, 2), BS, [ReplicaLoad(False, 0)] * 2)[0] in (0, 1)


def test_a_restarted_replica_is_forgotten():
    router = AffinityRouter()
    home, _ = router.pick(prompt(6, 0), BS, IDLE)
    router.forget(home)
    assert router.pick(prompt(6, 1), BS, IDLE)[1] == "load"


def test_short_prompts_go_to_the_least_loaded_then_the_emptier_cache():
    router = AffinityRouter()
    assert router.pick([1, 2], BS, [ReplicaLoad(True, 2), ReplicaLoad(True, 1)]) == (1, "load")
    assert router.pick([1, 2], BS, [ReplicaLoad(True, 1, 0.2), ReplicaLoad(True, 1, 0.9)]) == (0, "load")


def test_memory_is_bounded():
    router = AffinityRouter(capacity=10)
    for p in range(20):
        router.pick(prompt(p, 0), BS, IDLE)
    assert len(router._seen) == 10


def test_round_robin_takes_turns_and_skips_a_replica_that_is_down():
    router = RoundRobinRouter()
    three = [ReplicaLoad(True, 0)] * 3
    assert [router.pick(prompt(1, 0), BS, three)[0] for _ in range(4)] == [0, 1, 2, 0]
    one_down = [ReplicaLoad(True, 0), ReplicaLoad(False, 0), ReplicaLoad(True, 0)]
    assert [router.pick(prompt(1, 0), BS, one_down) for _ in range(3)] == [(2, "round_robin"), (0, "round_robin"),
                                                                           (2, "round_robin")]
    with pytest.raises(ValueError, match="must be one of affinity, round_robin"):
        make_router("random")


@pytest.mark.parametrize("lora", [None, ADAPTER_A])
def test_router_hashes_are_the_prefix_cache_blocks(lora):
    """What the router hashes is what the engine's prefix cache looks up: one definition, with
    the adapter's seed for a LoRA request (and another adapter's blocks are not its own)."""
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    ids = prompt(2, 0)
    req = Request("r", ids, SamplingParams(max_tokens=1), eos_token_ids=(), max_model_len=64,
                  lora_request=lora)
    assert kv.allocate_slots(req, len(ids)) is not None
    for seed, found in ((_seed(lora), True), (_seed(ADAPTER_B if lora is None else None), False)):
        router = AffinityRouter()
        router.pick(ids, BS, IDLE, seed)
        hashes = list(router._seen)  # the block hashes the router remembers for this request
        assert len(hashes) == 3 and [kv.pool.lookup(h) is not None for h in hashes] == [found] * 3


def test_an_adapter_request_follows_its_adapter_not_the_base_model():
    """The same prompt under an adapter goes to the replica that ran it under that adapter (whose
    prefix cache holds its KV), not to one that ran it on the base model or under another adapter."""
    router = AffinityRouter(load_slack=4)
    p = prompt(8, 0)
    home, _ = router.pick(p, BS, IDLE)  # the base model's blocks
    other = 1 - home
    home_busier = [ReplicaLoad(True, 2 if i == home else 0) for i in range(2)]
    other_busier = [ReplicaLoad(True, 2 if i == other else 0) for i in range(2)]
    assert router.pick(p, BS, home_busier, _seed(ADAPTER_A)) == (other, "load")  # no base-model blocks used
    assert router.pick(prompt(8, 1), BS, other_busier, _seed(ADAPTER_A)) == (other, "affinity")
    assert router.pick(prompt(8, 2), BS, home_busier) == (home, "affinity")
    assert router.pick(p, BS, other_busier, _seed(ADAPTER_B))[1] == "load"  # another adapter: new blocks
    # the frontend's replica set hashes with the request's adapter
    replicas = EngineReplicas([_client(100, 0.0, 0), _client(100, 0.0, 0)], AffinityRouter())
    p = prompt(8, 0, blocks=10)  # two blocks of the engine's 16
    first = replicas.pick(p, ADAPTER_A)
    assert replicas.pick(p, ADAPTER_A) is first
    replicas.pick(p)  # the base model: no blocks of its own on either replica yet
    assert replicas.routed[replicas.clients.index(first), "affinity"] == 1
    assert sum(n for (_, reason), n in replicas.routed.items() if reason == "load") == 2


def _seed(lora: LoRARequest | None) -> bytes | None:
    return None if lora is None else lora.hash_seed()


# ----- the replicas' state as the frontend sees it (services/frontend/replicas.py) ---------------

def _client(blocks: int, usage: float, running: int, *, heard_ago: float = 0.0, model: str = "m") -> EngineClient:
    """An engine client (never started) as it stands after hearing from its engine."""
    client = EngineClient("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    client.model_info = ModelInfo(model, "/m", 64, 100, [0], num_blocks=blocks, engine_id=f"{model}-{blocks}")
    client.last_pong = Pong(0, running, 1, engine_id=f"{model}-{blocks}", kv_cache_usage=usage)
    client.last_pong_time, client.last_heard = time.time(), time.monotonic() - heard_ago
    return client


def test_summed_report_weights_kv_use_by_blocks_and_leaves_out_a_silent_replica():
    replicas = EngineReplicas([_client(100, 0.5, 2), _client(300, 0.0, 1), _client(50, 1.0, 9, heard_ago=60)],
                              AffinityRouter())
    assert [load.up for load in replicas.loads()] == [True, True, False]
    pong, info = replicas.summed.last_pong, replicas.summed.model_info
    assert (pong.num_running, pong.num_waiting, pong.kv_cache_usage) == (3, 2, 0.125)
    assert info.num_blocks == 400
    assert replicas.loads()[0].load == 3  # running + waiting as reported (no request of ours open)


def test_a_replica_serving_another_model_gets_no_requests():
    replicas = EngineReplicas([_client(100, 0.0, 0), _client(100, 0.0, 0, model="other")], RoundRobinRouter())
    assert [load.up for load in replicas.loads()] == [True, False]
    assert {replicas.clients.index(replicas.pick(list(range(40)))) for _ in range(4)} == {0}


@pytest.mark.parametrize(("inputs", "outputs", "message"), [
    (("tcp://a:1", "tcp://b:1"), ("tcp://a:2",), "--engine-input gives 2 address(es) and --engine-output 1"),
    (("tcp://a:1", "tcp://a:1"), ("tcp://a:2", "tcp://b:2"), "--engine-input names an engine twice"),
    ((), (), "--engine-input gives 0 address(es)"),
])
def test_engine_addresses_are_checked(inputs, outputs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FrontendConfig(engine_inputs=inputs, engine_outputs=outputs)
