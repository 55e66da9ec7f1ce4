"""A worker's rank and meeting address from its flags, else torchrun's or LeaderWorkerSet's
variables; contradictions are a clear ValueError before anything starts."""

from __future__ import annotations

import argparse

import pytest

from services.worker.rendezvous import add_rendezvous_args, resolve


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_rendezvous_args(parser)
    return parser.parse_args(argv)


def test_flags_win_over_the_environment():
    env = {"MASTER_ADDR": "elsewhere", "MASTER_PORT": "1", "LWS_GROUP_SIZE": "4", "LWS_WORKER_INDEX": "0"}
    r = resolve(_args("--dist-init-addr", "10.0.0.1:6000", "--nnodes", "2", "--node-rank", "1"), 2, env)
    assert (r.init_method, r.rank, r.local_rank, r.world_size) == ("tcp://10.0.0.1:6000", 1, 0, 2)


def test_torchrun_variables():
    env = {"MASTER_ADDR": "head", "MASTER_PORT": "7000", "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    r = resolve(_args("--nnodes", "2", "--node-rank", "1"), 4, env)
    assert (r.init_method, r.rank, r.local_rank) == ("tcp://head:7000", 3, 1)


def test_leaderworkerset_variables():
    env = {"LWS_LEADER_ADDRESS": "pagedserve-tp-0.pagedserve-tp", "LWS_GROUP_SIZE": "4", "LWS_WORKER_INDEX": "2"}
    r = resolve(_args(), 4, env)
    assert (r.init_method, r.rank, r.local_rank) == ("tcp://pagedserve-tp-0.pagedserve-tp:29500", 2, 0)
    assert resolve(_args(), 1, {}).init_method == "tcp://127.0.0.1:29500"


@pytest.mark.parametrize(("argv", "env", "message"), [
    (("--nnodes", "3"), {}, "must divide the replica's 4 rank"),
    (("--nnodes", "2", "--node-rank", "2"), {}, "within 0..1"),
    ((), {"WORLD_SIZE": "8"}, "$WORLD_SIZE is 8, but the replica has 4"),
    (("--nnodes", "2"), {}, "2 ranks per node: give each worker its --rank"),
    (("--nnodes", "2", "--node-rank", "1", "--rank", "0"), {}, "rank 0 is not on node 1"),
    (("--rank", "0", "--dist-init-addr", "nohost"), {}, "must be HOST:PORT"),
    (("--rank", "0", "--dist-init-addr", "h:99999"), {}, "must be HOST:PORT"),
    (("--rank", "0", "--dist-timeout", "0"), {}, "--dist-timeout must be positive"),
    ((), {"LWS_GROUP_SIZE": "two"}, "$LWS_GROUP_SIZE must be an integer"),
])
def test_contradictions_are_named(argv, env, message):
    with pytest.raises(ValueError) as info:
        resolve(_args(*argv), 4, env)
    assert message in str(info.value)
