"""vibee/runtime/host_copy.py: host values to a device, queued without waiting for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vibee.runtime.host_copy import to_device


@pytest.mark.parametrize("values", [[3, 1, 4], np.array([3, 1, 4], dtype=np.int64), (3, 1, 4)])
def test_values_arrive_with_the_dtype_asked_for(values):
    out = to_device(values, "cpu")
    assert out.dtype == torch.long and out.tolist() == [3, 1, 4]
    assert to_device(values, "cpu", torch.float32).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_copy_queued_behind_running_work_lands_after_it():
    """Queued behind a long kernel on the stream, the copy does not make the host wait for the
    kernel, and what the next kernel reads is the copied values."""
    big = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    busy = big @ big  # queued, still running when the copy is queued
    out = to_device(np.arange(1000), "cuda")
    assert not torch.cuda.current_stream().query()  # the host went on while the matmul ran
    assert (out + busy[0, 0] * 0).tolist() == list(range(1000))
