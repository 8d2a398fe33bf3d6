"""Host values to the GPU without waiting for it.

A plain copy of host memory to a GPU (``tensor.to("cuda")``) synchronizes with the stream: it
waits for every kernel queued before it, such as the step still running while the engine
launches the next. Copied from pinned memory without blocking, it is queued like a kernel, and
the host goes on (PyTorch keeps the pinned block until the copy is done).
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (a list or a numpy array) as a tensor of `dtype` on `device`, queued without
    waiting for the device's earlier work."""
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
