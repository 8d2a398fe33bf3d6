"""A tensor-parallel worker: ranks 1..N-1 of an engine whose rank 0 schedules and samples.

A worker loads the same model and specs as rank 0, keeps its shard of each layer (the spec's
plan), sizes and allocates its own paged KV cache over its KV heads, and then mirrors rank 0:
for every header rank 0 sends it runs the same forward (the parallel layers' collectives pair
up), swaps the same blocks, runs the Medusa heads over the same hidden states (their logits are
vocab-parallel), or stops. It samples nothing and keeps no sequences: the block tables come with
each step.

Started by rank 0 (`python -m vibee.runtime.rank_worker`, its EngineConfig in the environment)
or by torchrun as `vibee serve` on a rank other than 0 (vibee/cli.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.rank_group import CONFIG_ENV, RankGroup, RankLost, torchrun_place, worker_config

log = logging.getLogger("vibee.engine")
PARENT_POLL_S = 1.0  # how often a launched worker checks that rank 0's process is still there


class RankWorker:
    """One worker rank's model shard and KV cache, and the loop that mirrors rank 0's steps."""

    def __init__(self, config: Any, gen: Any, ranks: RankGroup):
        from vibee.runtime.engine import TORCH_DTYPES
        from vibee.runtime.kv_sizing import decide_num_blocks, host_kv_swap, paged_kv_cache, run_worst_case_step
        from vibee.runtime.served_model import load_served_model, max_model_len_for

        self.ranks = ranks
        self.device = ranks.device
        dtype = TORCH_DTYPES[config.resolve_dtype(self.device)]
        served = load_served_model(config, gen, dtype=dtype, device=self.device, progress=False, ranks=ranks)
        self.model = served.model
        kv_spec, batch_spec = gen.configs.kv_cache, gen.configs.continuous_batch
        self.block_size = kv_spec.block_size
        max_model_len = max_model_len_for(config, served.config)
        bytes_per_block = paged_kv_cache(gen.kv_cache, served.config, served.num_kv_heads, 1, dtype=dtype, device="meta",
                                         block_size=self.block_size).bytes_per_block()
        # The same sizing as rank 0's, in step with it: on a GPU its profiled forward pairs with ours.
        sizes = dict(max_num_batched_tokens=batch_spec.max_num_batched_tokens, max_num_seqs=batch_spec.max_num_seqs,
                     max_model_len=max_model_len)
        num_blocks, _ = decide_num_blocks(
            config=config, kv_spec=kv_spec, device=self.device, bytes_per_block=bytes_per_block,
            block_size=self.block_size, wants_graphs=False, **sizes,
            run_worst_case_step=lambda: run_worst_case_step(self.model, device=self.device, block_size=self.block_size,
                                                            num_speculative_tokens=0, draft_step=None, **sizes))
        num_blocks = ranks.agree_num_blocks(num_blocks)
        self.kv_cache = (paged_kv_cache(gen.kv_cache, served.config, served.num_kv_heads, num_blocks, dtype=dtype,
                                        device=self.device, block_size=self.block_size) if config.kv_cache else None)
        self.host_swap = host_kv_swap(gen.kv_cache, batch_spec, self.kv_cache, bytes_per_block)
        self.last_hidden = None  # the last step's final hidden states of its logits rows
        # Medusa heads read the vocab-parallel lm_head: the worker runs them beside rank 0 on its own
        # copy of each step's hidden states, so that their logits' all-gathers pair up
        self.medusa = None
        spec = gen.configs.speculative_decode
        if config.speculating and spec.method == "medusa":
            from vibee.runtime.medusa_drafter import MedusaDrafter, heads_path

            self.medusa = MedusaDrafter(gen, self.model, heads_path(spec, None if config.shape is not None else config.model_dir),
                                        spec.num_speculative_tokens, dtype=dtype, device=self.device)

    def serve(self) -> None:
        """Mirror rank 0 until it says stop."""
        from vibee.runtime.model_runner import forward_rows
        from vibee.runtime.prompt_logprobs import prompt_logits

        while True:
            header = self.ranks.receive()
            kind = header[0]
            if kind == "step":
                _, num_tokens, query_lens, seq_lens, tables, logit_rows = header
                ids = self.ranks.share_ids(torch.empty(num_tokens, dtype=torch.long, device=self.device))
                batch = make_attention_batch(query_lens, seq_lens, tables, self.block_size, self.device)
                self.last_hidden, _ = forward_rows(self.model, self.kv_cache, ids, batch, logit_rows, self.device)
            elif kind == "medusa":  # rank 0 drafts from these rows of the last step's hidden states
                with torch.inference_mode():
                    rows = torch.tensor(header[1], device=self.last_hidden.device)
                    self.medusa.heads.propose(self.last_hidden[rows], self.model.compute_logits, self.medusa.k)
            elif kind == "score":  # a prompt's own logprobs: the same forward, the same logits chunks
                ids = self.ranks.share_ids(torch.empty(header[1], dtype=torch.long, device=self.device))
                for _ in prompt_logits(self.model, ids, block_size=self.block_size, device=self.device):
                    pass
            elif kind == "swap":
                self.host_swap.swap_out(header[1])
                self.host_swap.swap_in(header[2])
            elif kind == "stop":
                return
            else:
                raise ValueError(f"unknown tensor-parallel header {kind!r}")


def _watch_parent() -> None:
    """A worker rank 0 launched ends with it, even when rank 0 was killed between steps."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        log.error("tensor-parallel worker: rank 0's process is gone; exiting")
        os._exit(1)

    threading.Thread(target=watch, name="vibee-parent-watch", daemon=True).start()


def run_rank_worker(config: Any) -> int:
    """A worker's whole life; returns its exit code."""
    from vibee.runtime.generated import load_generated

    place = torchrun_place()
    if place is None or place.rank == 0:
        raise ValueError("a tensor-parallel worker needs RANK >= 1 and WORLD_SIZE in its environment")
    device = config.resolve_device()
    gen = load_generated(config.spec_dir, config.knob_settings(config.resolve_dtype(device)))
    tp = gen.configs.tensor_parallel
    if tp.tp_size != place.size:
        raise ValueError(f"{place.size} ranks were started but the tensor-parallel size is {tp.tp_size}")
    ranks = RankGroup.worker(gen.tensor_parallel, place, tp.backend, device)
    try:
        RankWorker(config, gen, ranks).serve()
    except RankLost as exc:
        log.error("%s; exiting", exc)
        return 1
    finally:
        ranks.leave()
    return 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if CONFIG_ENV in os.environ:  # launched by rank 0: a Ctrl-C reaches us too, but stopping is rank 0's call
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _watch_parent()
    try:
        code = run_rank_worker(worker_config())
    except Exception as exc:
        from vibee.engine_flags import render_user_error

        message = render_user_error(exc)
        if message is None:  # a bug: its traceback
            raise
        print(f"tensor-parallel rank {os.environ.get('RANK')}: {message}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
