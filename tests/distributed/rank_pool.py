"""A pool of W processes joined in one gloo process group, started once and reused by many test
cases: each case sends every rank a task (a module-level function and its arguments) and waits,
with a timeout, for every rank's answer. Starting processes and importing torch is what costs
time on a 2-core machine, so hypothesis examples run in the pool rather than in fresh processes.

The processes come from a forkserver that has imported torch and the project once: forking it
costs milliseconds, where spawning imports torch again in every process (seconds on 2 cores), and
forking the test process itself is unsafe once its OpenMP threads exist.

Tasks that fail in a way every rank agrees on (the sharded indexer's input checks) leave the group
usable; tests that kill or stall a rank start their own processes (see test_rank_failures.py)."""
from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

# Bounds every collective inside the pool; a stuck case fails instead of hanging the suite.
COLLECTIVE_TIMEOUT_S = 60
ANSWER_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world: int, port: int, timeout_s: float) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s))


@dataclass
class RankAnswer:
    rank: int
    value: Any = None
    error: str | None = None  # "ExceptionType: message" when the task raised


def _serve(rank: int, world: int, port: int, tasks, answers) -> None:
    init_gloo(rank, world, port, COLLECTIVE_TIMEOUT_S)
    import misa_compile  # noqa: F401  (registers the misa ops)

    while True:
        task = tasks.get()
        if task is None:
            break
        fn, kwargs = task
        try:
            answers.put(RankAnswer(rank, value=fn(**kwargs)))
        except Exception as error:  # reported to the test, which decides what is expected
            answers.put(RankAnswer(rank, error=f"{type(error).__name__}: {error}",
                                   value=traceback.format_exc()))
    torch.distributed.destroy_process_group()


def process_context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "misa_compile", "tests.distributed.rank_tasks"])
    return ctx


class RankPool:
    def __init__(self, world: int):
        ctx = process_context()
        self.world = world
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._answers = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, args=(r, world, port, self._tasks[r],
                                                        self._answers), daemon=True)
                       for r in range(world)]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable, per_rank_kwargs: list[dict]) -> list[RankAnswer]:
        """Runs fn(**per_rank_kwargs[r]) on every rank r; answers by rank."""
        assert len(per_rank_kwargs) == self.world
        for rank, kwargs in enumerate(per_rank_kwargs):
            self._tasks[rank].put((fn, kwargs))
        answers: dict[int, RankAnswer] = {}
        while len(answers) < self.world:
            try:
                answer = self._answers.get(timeout=ANSWER_TIMEOUT_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                raise AssertionError(f"rank pool of {self.world}: no answer within "
                                     f"{ANSWER_TIMEOUT_S}s (answered: {sorted(answers)}, "
                                     f"dead ranks: {dead})") from None
            answers[answer.rank] = answer
        return [answers[r] for r in range(self.world)]

    def close(self) -> None:
        for tasks in self._tasks:
            tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
