"""Host-to-device copies of the small per-step tensors (token ids, positions, slots, block tables).

On CUDA they are staged in pinned (page-locked) host memory and copied with non_blocking=True:
a DMA the host does not wait for, ordered on the current stream before the kernels that read
it. PyTorch's caching host allocator keeps a pinned block alive until the copies recorded on it
have run, so the host tensor may be dropped right after the call. On CPU nothing changes: the
tensor is used where it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _is_cuda(device: torch.device | str) -> bool:
    return (device if isinstance(device, str) else device.type).startswith("cuda")


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """host (a CPU tensor) on device: pinned + non_blocking on CUDA, host.to(device) elsewhere."""
    if not _is_cuda(device):
        return host.to(device)
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def tensor_to_device(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(values, dtype) on device, built directly in pinned memory when it goes to CUDA."""
    if not _is_cuda(device):
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, host: torch.Tensor) -> None:
    """dst.copy_(host) for a CPU host tensor; from pinned memory without blocking when dst is on CUDA."""
    if dst.device.type != "cuda":
        dst.copy_(host)
        return
    if not host.is_pinned():
        host = host.pin_memory()
    dst.copy_(host, non_blocking=True)
