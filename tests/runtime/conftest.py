"""Fixtures shared by the runtime's tests: the built-in model's engine on the CPU (one per test
module) and its vocabulary's bytes, as the grammar tests read them."""

from __future__ import annotations

import pytest

from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.token_dfa import token_bytes


@pytest.fixture(scope="module")
def eng():
    return LLMEngine(EngineConfig(device="cpu", cpu_kv_cache_gib=0.25, seed=0), progress=False)


@pytest.fixture(scope="module")
def tokens(eng):
    return token_bytes(eng.structured.ll_tokenizer, eng.tokenizer.vocab_size)
