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


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """host (a CPU tensor) on device: pinned + non_blocking on CUDA, host.to(device) elsewhere."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def tensor_to_device(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(values, dtype) on device, built directly in pinned memory when it goes to CUDA."""
    pinned = torch.device(device).type == "cuda"
    return to_device(torch.tensor(values, dtype=dtype, pin_memory=pinned), device)
