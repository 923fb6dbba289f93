"""Host-to-device copies that do not make the host wait.

A copy from ordinary (pageable) host memory to a CUDA device is synchronous: the host waits
until the device has run everything queued before it. A copy from pinned (page-locked) memory
with `non_blocking=True` is queued like a kernel and the host goes on, so a step's inputs can
follow its kernels into the stream without a host sync. The pinned block comes from torch's
caching host allocator, which records the copy and reuses the block only once it has run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`; to a CUDA device through pinned memory, queued
    without a host sync. Elsewhere (or already there) a plain `.to`."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def upload(target: torch.Tensor, source: torch.Tensor) -> None:
    """target (a device buffer, e.g. a CUDA graph's static input) <- source (on the host),
    queued without a host sync on CUDA."""
    if target.device.type == "cuda" and source.device.type == "cpu":
        target.copy_(source.pin_memory(), non_blocking=True)
    else:
        target.copy_(source)
