"""Run a function on several local CPU processes joined by a gloo process group (tests, benchmarks).

``run_processes(fn, world_size, *args)`` spawns ``world_size`` processes, each of which
initialises ``torch.distributed`` (gloo, file rendezvous in a temporary directory: no port
to pick, nothing left behind), sets one intra-op thread, calls ``fn(group, *args)`` and
sends back its return value (or the exception it raised, as ``RankError``). The caller
gets the list of per-rank results. Processes still alive after ``timeout_s`` are killed
and reported, so a hang fails a test instead of blocking it.
"""
from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, List

import torch

__all__ = ["RankError", "run_processes"]


@dataclass
class RankError:
    """What a rank raised: its type name, message and formatted traceback."""

    type: str
    message: str
    traceback: str


def _worker(rank: int, world_size: int, init_file: str, group_timeout_s: float, results: Any,
            fn: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py (CPU only)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=group_timeout_s))
    try:
        out: Any = _portable(fn(dist.group.WORLD, *args))
    except BaseException as exc:  # noqa: BLE001  (sent back to the parent as data)
        out = RankError(type(exc).__name__, str(exc), traceback.format_exc())
    results.put((rank, out))
    dist.destroy_process_group()


def _portable(value: Any) -> Any:
    # Tensors go back as numpy arrays: a tensor through a torch.multiprocessing queue is
    # shared memory that the sender must keep alive until the receiver has it.
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(v) for v in value)
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value


def run_processes(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0,
                  group_timeout_s: float = 60.0) -> List[Any]:
    """``[fn(group, *args) on rank r for r in range(world_size)]``, each in its own process.

    ``fn`` must be importable (a module-level function); tensors in its result come back as
    numpy arrays. A rank's exception comes back as a :class:`RankError`, a rank that exited
    without a result as ``RankError("exited", ...)``; a rank still running after
    ``timeout_s`` makes this raise ``TimeoutError`` after every process it started has been
    stopped.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="safa-dist-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, group_timeout_s, results, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out: List[Any] = [None] * world_size
        got, deadline = set(), time.monotonic() + timeout_s
        try:
            while len(got) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    rank, value = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    if all(not p.is_alive() for p in procs) and results.empty():
                        break  # every process has exited: nothing more will come
                    continue
                out[rank] = value
                got.add(rank)
        finally:
            for p in procs:
                p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            for r in hung:
                procs[r].kill()
                procs[r].join()
        hung = [r for r in hung if r not in got]
        if hung:
            raise TimeoutError(f"rank(s) {hung} still running after {timeout_s} s without a result; stopped")
        for r in sorted(set(range(world_size)) - got):
            out[r] = RankError("exited", f"rank {r} exited with code {procs[r].exitcode} without a result", "")
    return out
