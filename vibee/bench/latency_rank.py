"""`bench latency --tensor-parallel-size N`: the ranks of the measurement. Rank 0 is the command;
it launches ranks 1..N-1 as `python -m vibee.bench.latency_rank` with the command's options in
the environment (or torchrun starts every rank as the command itself). Each rank builds the same
model, keeps its shard and runs the same steps (vibee/bench/latency.py measure_rank)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from vibee.runtime.rank_group import RankGroup, torchrun_place

PARAMS_ENV = "VIBEE_LATENCY_PARAMS"  # the command's options, as JSON, for the ranks it launches


def latency_ranks(params: dict[str, Any]) -> RankGroup | None:
    """This process's group for params["tp_size"] ranks (None for one): rank 0's, launching the
    others unless torchrun did, or a torchrun rank's."""
    size = params["tp_size"]
    if size == 1:
        return None
    from vibee.engine_flags import engine_config
    from vibee.runtime.generated import load_generated

    config = engine_config(model=params["model"], device=params["device"], dtype=params["dtype"])
    device = config.resolve_device()
    gen = load_generated(config.spec_dir, config.knob_settings(config.resolve_dtype(device)))
    backend = gen.configs.tensor_parallel.backend
    place = torchrun_place()
    if place is not None and place.rank > 0:
        return RankGroup.worker(gen.tensor_parallel, place, backend, device)
    return RankGroup.start(gen.tensor_parallel, size, backend, device,
                           command=[sys.executable, "-m", "vibee.bench.latency_rank"],
                           env={PARAMS_ENV: json.dumps(params)})


def main() -> None:
    from vibee.bench.latency import measure_rank

    params = json.loads(os.environ[PARAMS_ENV])
    ranks = latency_ranks(params)
    try:
        measure_rank(params, ranks)
    except BaseException:
        ranks.leave()
        raise
    ranks.finish()


if __name__ == "__main__":
    main()
