"""Where and as which rank a worker joins its replica's torch.distributed group, on one host or
several.

Flags first (`--dist-init-addr HOST:PORT`, `--nnodes`, `--node-rank`, `--rank`, each also read
from its PAGEDSERVE_* variable), then the variables torchrun sets (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK, LOCAL_RANK) and those LeaderWorkerSet sets (LWS_LEADER_ADDRESS,
LWS_GROUP_SIZE, LWS_WORKER_INDEX). A group that does not assemble within --dist-timeout fails
with an error naming the address, never a hang.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist

from shared.engine_args import DEFAULT_DIST_TIMEOUT_S, add_flag

DEFAULT_PORT = 29500


class RendezvousError(RuntimeError):
    """The ranks could not form their group (a rank missing, an address unreachable)."""


@dataclass(frozen=True)
class Rendezvous:
    init_method: str  # tcp://HOST:PORT
    rank: int  # in the replica's whole group
    local_rank: int  # on this node: picks the GPU
    world_size: int
    timeout_s: float


def add_rendezvous_args(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--rank", None, "this worker's rank in the replica (default: $RANK, else node rank x ranks "
             "per node + $LOCAL_RANK)", kind=int)
    add_flag(parser, "--dist-init-addr", None, "HOST:PORT where the ranks meet (rank 0 listens there; default: "
             "$MASTER_ADDR:$MASTER_PORT, $LWS_LEADER_ADDRESS:29500, else 127.0.0.1:29500)", kind=str)
    add_flag(parser, "--nnodes", None, "hosts the replica's ranks span (default: $LWS_GROUP_SIZE, else 1)", kind=int)
    add_flag(parser, "--node-rank", None, "this host's index among them (default: $LWS_WORKER_INDEX, else 0)",
             kind=int)
    add_flag(parser, "--dist-timeout", DEFAULT_DIST_TIMEOUT_S, "seconds to wait for every rank to join before "
             "failing, and for a collective (a rank that stopped answering) before exiting")


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def _address(flag: str | None, env: Mapping[str, str]) -> str:
    if flag:
        addr = flag
    elif env.get("MASTER_ADDR"):
        addr = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT') or DEFAULT_PORT}"
    elif env.get("LWS_LEADER_ADDRESS"):
        addr = f"{env['LWS_LEADER_ADDRESS']}:{DEFAULT_PORT}"
    else:
        addr = f"127.0.0.1:{DEFAULT_PORT}"
    host, sep, port = addr.removeprefix("tcp://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--dist-init-addr must be HOST:PORT, got {addr!r}")
    return f"tcp://{host}:{port}"


def resolve(args: argparse.Namespace, world_size: int, env: Mapping[str, str] = os.environ) -> Rendezvous:
    """This worker's rendezvous from its flags and environment; ValueError on a contradiction."""
    nnodes = args.nnodes if args.nnodes is not None else _int(env.get("LWS_GROUP_SIZE"), "LWS_GROUP_SIZE") or 1
    node_rank = args.node_rank if args.node_rank is not None else _int(env.get("LWS_WORKER_INDEX"),
                                                                        "LWS_WORKER_INDEX") or 0
    if nnodes < 1 or world_size % nnodes:
        raise ValueError(f"--nnodes {nnodes} must divide the replica's {world_size} rank(s)")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} must be within 0..{nnodes - 1}")
    declared = _int(env.get("WORLD_SIZE"), "WORLD_SIZE")
    if declared is not None and declared != world_size:
        raise ValueError(f"$WORLD_SIZE is {declared}, but the replica has {world_size} rank(s) "
                         "(tensor x pipeline parallel size)")
    per_node = world_size // nnodes
    rank = args.rank if args.rank is not None else _int(env.get("RANK"), "RANK")
    if rank is None:
        local = _int(env.get("LOCAL_RANK"), "LOCAL_RANK")
        if local is None and per_node > 1:
            raise ValueError(f"{per_node} ranks per node: give each worker its --rank (or $RANK / $LOCAL_RANK)")
        rank = node_rank * per_node + (local or 0)
    first = node_rank * per_node
    if not first <= rank < first + per_node:
        raise ValueError(f"rank {rank} is not on node {node_rank} of {nnodes} (its ranks: {first}..{first + per_node - 1})")
    if args.dist_timeout <= 0:
        raise ValueError("--dist-timeout must be positive")
    return Rendezvous(_address(args.dist_init_addr, env), rank, rank - first, world_size, args.dist_timeout)


def join(rdzv: Rendezvous, backend: str) -> None:
    """Form the process group (a no-op for one rank); RendezvousError when it does not assemble
    within the timeout."""
    if rdzv.world_size == 1:
        return
    try:
        dist.init_process_group(backend, init_method=rdzv.init_method, rank=rdzv.rank, world_size=rdzv.world_size,
                                timeout=datetime.timedelta(seconds=rdzv.timeout_s))
    except (RuntimeError, TimeoutError) as exc:  # DistStoreError, DistNetworkError, gloo's timeouts
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousError(
            f"rank {rdzv.rank} of {rdzv.world_size}: the ranks did not all join at {rdzv.init_method} within "
            f"{rdzv.timeout_s:g}s (--dist-timeout); check that every rank runs and reaches that address "
            f"({type(exc).__name__}: {first_line})"
        ) from None
