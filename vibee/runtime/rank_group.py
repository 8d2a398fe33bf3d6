"""The ranks of a tensor-parallel engine: rank 0 is the engine (scheduler, sampler, server side),
ranks 1..N-1 are workers (rank_worker.py) that mirror each forward over their own shard and KV
cache. (`bench latency -tp N` uses the same group, every rank taking the same steps.)

Two ways to start: `vibee serve --tensor-parallel-size N` launches the N - 1 workers itself
(`python -m vibee.runtime.rank_worker`, one per device), or `torchrun --nproc-per-node N -m vibee
serve ...` starts every rank and rank 0 finds the others through torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Either way the ranks meet by env://.

Two process groups: the generated tensor_parallel module's (NCCL on GPUs, gloo on CPUs), over
which the parallel layers all-reduce and the step's token ids travel; and a gloo group for the
step headers (small pickled tuples), whose timeout is long because an idle server sends nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

CONFIG_ENV = "VIBEE_ENGINE_CONFIG"  # a launched worker's EngineConfig, as JSON
LAUNCHER_ENV = "VIBEE_LAUNCHER"  # set on the workers rank 0 launches
HEADER_TIMEOUT = timedelta(days=365)  # a worker waits for the next step as long as the server idles
STOP_WAIT_S = 10.0  # how long close() waits for a worker to exit before killing it


class RankLost(RuntimeError):
    """A rank exited or its connection broke: the group cannot compute another step."""


@dataclass(frozen=True)
class RankPlace:
    """Where this process is in the group."""

    rank: int
    size: int
    local_rank: int
    launcher: str  # "vibee" (workers launched by rank 0) or "torchrun"
    init_method: str = "env://"


def torchrun_place() -> RankPlace | None:
    """This process's place when torchrun (or any env:// launcher) started it, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    size = int(os.environ["WORLD_SIZE"])
    if size < 2:
        return None
    launcher = os.environ.get(LAUNCHER_ENV, "torchrun")
    return RankPlace(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), launcher)


def rank_device(device: str, local_rank: int) -> str:
    """The device of the rank on this host: cuda:<local rank> on GPUs, cpu otherwise."""
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"tensor-parallel rank {local_rank} needs GPU {local_rank}, but "
                             f"{torch.cuda.device_count()} GPU(s) are visible")
        return f"cuda:{local_rank}"
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """This process's membership of the group (rank 0's holds its workers' processes too)."""

    def __init__(self, tp: Any, place: RankPlace, device: str, backend: str, workers: list[subprocess.Popen]):
        self.tp = tp
        self.rank, self.size, self.launcher, self.init_method = place.rank, place.size, place.launcher, place.init_method
        self.device = device
        self.backend = backend
        self.workers = workers
        self.group = None
        self.headers = None
        self.devices: list[str] = [device]
        self.closed = False

    @classmethod
    def start(cls, tp: Any, size: int, backend: str, device: str, *, command: list[str],
              env: dict[str, str]) -> "RankGroup":
        """Rank 0: launch the workers (unless torchrun did) and join them. tp: the generated
        tensor_parallel module; backend: the spec's (auto: nccl on GPUs, gloo otherwise);
        command and env: what each worker runs, and what it needs to know besides its rank."""
        place = torchrun_place()
        workers: list[subprocess.Popen] = []
        if place is not None:
            if place.size != size:
                raise ValueError(f"torchrun started {place.size} processes but --tensor-parallel-size is {size}: "
                                 "give torchrun --nproc-per-node the tensor-parallel size")
            if place.rank != 0:
                raise ValueError("RankGroup.start is rank 0's; the other ranks join with RankGroup.worker")
        else:
            port = _free_port()
            place = RankPlace(0, size, 0, "vibee", f"tcp://127.0.0.1:{port}")
            env = {**os.environ, **env, LAUNCHER_ENV: "vibee", "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
            for rank in range(1, size):
                workers.append(subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        group = cls(tp, place, rank_device(device, place.local_rank), tp.resolve_backend(backend), workers)
        try:
            group.join()
        except BaseException:
            group.close()
            raise
        return group

    @classmethod
    def worker(cls, tp: Any, place: RankPlace, backend: str, device: str) -> "RankGroup":
        """A worker's membership (rank_worker.py)."""
        group = cls(tp, place, rank_device(device, place.local_rank), tp.resolve_backend(backend), [])
        group.join()
        return group

    def join(self) -> None:
        """Meet the other ranks, then tell each other which device each holds."""
        if self.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # The ranks share the host's cores: spinning threads of one would starve the peer it waits on.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // self.size))
        self.group = self.tp.init_tensor_parallel(self.rank, self.size, self.backend, init_method=self.init_method)
        self.headers = dist.new_group(backend="gloo", timeout=HEADER_TIMEOUT)
        devices: list[Any] = [None] * self.size
        dist.all_gather_object(devices, self.device, group=self.headers)
        self.devices = devices

    # --- what crosses each step -----------------------------------------------------------------

    def send(self, header: tuple) -> None:
        """Rank 0: a step's header to every worker, once each worker it launched is known to run:
        a broadcast to a peer already gone may wait (the headers' timeout is the server's idle
        time) instead of failing."""
        self.check()
        self._checked(dist.broadcast_object_list, [header], src=0, group=self.headers)

    def receive(self) -> tuple:
        """A worker: the next header rank 0 sends (blocks while the server idles)."""
        box: list[Any] = [None]
        self._checked(dist.broadcast_object_list, box, src=0, group=self.headers)
        return box[0]

    def share_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The step's token ids, from rank 0's device to every rank's (no host copy on GPUs)."""
        self._checked(dist.broadcast, ids, src=0, group=self.group)
        return ids

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV blocks every rank can hold (each sized its own memory): the fewest."""
        t = torch.tensor([num_blocks], dtype=torch.long)
        self._checked(dist.all_reduce, t, op=dist.ReduceOp.MIN, group=self.headers)
        return int(t.item())

    def _checked(self, collective, *args, **kwargs) -> None:
        try:
            collective(*args, **kwargs)
        except (RuntimeError, ValueError, ConnectionError) as exc:  # gloo: "Connection closed by peer", ...
            raise RankLost(f"tensor-parallel rank {self.rank} lost its group: {self.lost() or exc}") from exc

    # --- liveness and shutdown ------------------------------------------------------------------

    def lost(self) -> str | None:
        """Why a worker that rank 0 launched is gone, or None while all run."""
        for rank, proc in enumerate(self.workers, start=1):
            code = proc.poll()
            if code is not None:
                return f"tensor-parallel rank {rank} exited (exit code {code})"
        return None

    def check(self) -> None:
        """Raise RankLost when a launched worker is gone."""
        why = self.lost()
        if why is not None:
            raise RankLost(why)

    def close(self) -> None:
        """Rank 0: tell the workers to stop, wait for them (killing any that hang), leave the group."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0 and self.headers is not None and self.lost() is None:
            try:
                self.send(("stop",))
            except RankLost:
                pass
        self._end_workers()

    def finish(self) -> None:
        """Every rank of a run where all ranks took the same steps (bench latency): meet, then
        leave; rank 0 waits for the workers it launched."""
        self._checked(dist.barrier, group=self.headers)
        self.closed = True
        self._end_workers()

    def _end_workers(self) -> None:
        deadline = time.monotonic() + STOP_WAIT_S
        for proc in self.workers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.leave()

    def leave(self) -> None:
        if self.group is not None or self.headers is not None:
            self.tp.destroy_tensor_parallel()
            self.group = self.headers = None

    def describe(self) -> dict[str, Any]:
        """What /v1/inference/info reports."""
        return {"tp_size": self.size, "backend": self.backend, "launcher": self.launcher, "rank_devices": self.devices}


def start_ranks(config: Any, gen: Any, device: str) -> RankGroup | None:
    """Rank 0's group when the spec's tp_size (or --tensor-parallel-size) is above 1, else None."""
    tp = gen.configs.tensor_parallel
    if tp.tp_size == 1:
        return None
    return RankGroup.start(gen.tensor_parallel, tp.tp_size, tp.backend, device,
                           command=[sys.executable, "-m", "vibee.runtime.rank_worker"],
                           env={CONFIG_ENV: config.model_dump_json()})


def worker_config() -> Any:
    """A launched worker's EngineConfig (rank 0 put it in the environment)."""
    from vibee.runtime.config import EngineConfig

    return EngineConfig(**json.loads(os.environ[CONFIG_ENV]))
