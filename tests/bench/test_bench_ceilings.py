"""The benchmark ceilings: copy bandwidth and matmul throughput measured in the running process,
once per (device, dtype)."""

from __future__ import annotations

import math

import pytest
import torch

from vibee.bench.ceilings import measure_ceilings


def _check_measured(c, device_name: str, dtype_name: str):
    assert c.device_name == device_name and c.dtype == dtype_name
    for figure in (c.copy_tb_s, c.matmul_tflop_s):
        assert figure > 0 and math.isfinite(figure)
    assert "copy" in c.how and "matmul" in c.how


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_ceilings_are_measured_once_per_dtype(dtype):
    first = measure_ceilings("cpu", dtype)
    _check_measured(first, "cpu", str(dtype).split(".")[-1])
    assert measure_ceilings("cpu", dtype) is first  # cached: the second call measures nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ceilings_name_the_device_and_share_one_measurement():
    c = measure_ceilings("cuda", torch.bfloat16)
    _check_measured(c, torch.cuda.get_device_name(0), "bfloat16")
    assert measure_ceilings(f"cuda:{torch.cuda.current_device()}", torch.bfloat16) is c
