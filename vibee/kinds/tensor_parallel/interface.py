"""What the runtime uses of a generated tensor_parallel module: nothing yet. Serving runs one rank
(`vibee serve --tensor-parallel-size 2` is refused) and reports the spec's plan from the IR; the
generated layers are exercised by their own suite. When tensor-parallel serving is built, what it
calls (init_tensor_parallel, parallelize, ...) is declared here first."""

from __future__ import annotations

from typing import Protocol


class TensorParallelModule(Protocol):
    """The generated tensor_parallel module (vibee_gen/<module>.py)."""
