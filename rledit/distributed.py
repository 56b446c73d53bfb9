"""Several processes: which one this is, and sharing what each computed.

A command launched as several processes (``accelerate launch --num_processes N ...`` on GPUs, or
``python -m torch.distributed.run --nproc_per_node N ...`` anywhere, which set ``WORLD_SIZE``) calls
:func:`start`, which joins the process group through accelerate's ``PartialState`` (NCCL on GPUs, gloo on CPUs).
A plain run is one process: :func:`start` does nothing, :func:`world` is (0, 1) and :func:`gather` returns
``[value]``. Every process must then call the same collective functions in the same order.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """The process group could not start (the message says what the launcher gave)."""


def start() -> None:
    """Join the process group when launched as several processes (``WORLD_SIZE`` > 1); otherwise nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1 or dist.is_initialized():
        return
    from accelerate import PartialState

    try:
        state = PartialState(cpu=not torch.cuda.is_available())
    except Exception as error:
        launcher = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        raise DistributedError(f"the process group of {size} processes could not start ({launcher}): "
                               f"{type(error).__name__}: {error}") from error
    if state.num_processes != size:
        raise DistributedError(f"WORLD_SIZE is {size} but the process group has {state.num_processes} processes")


def finish(code: int, wait: bool = True) -> None:
    """End a process of a launched run (nothing outside a process group): wait for every process (``wait``; not
    after an error, when the others may never arrive), leave the group, and exit with ``code`` at once.

    Exiting at once, after flushing, skips the interpreter's and the C++ libraries' teardown. Once transformers
    has loaded anything, the gloo process group outlives ``destroy_process_group`` (its loop threads keep
    running), and tearing it down at exit aborts now and then ("terminate called without an active exception",
    SIGABRT) after all the work is done and saved, which the launcher reports as a failed run."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


_alone = False  # see alone()


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside a process group (the rank stays the
    process's own inside :func:`alone`, the number of processes is 1 there)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), 1 if _alone else dist.get_world_size()
    return 0, 1


@contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process works by itself: nothing is shared out or gathered (e.g. the validation
    rank 0 runs while the others wait)."""
    global _alone
    outer, _alone = _alone, True
    try:
        yield
    finally:
        _alone = outer


def barrier() -> None:
    """Wait until every process got here (nothing outside a process group)."""
    if world()[1] > 1:
        dist.barrier()


def is_main() -> bool:
    """Whether this is the process that logs, writes results and saves (rank 0)."""
    return world()[0] == 0


def gather(value: Any) -> list[Any]:
    """Every process's ``value`` (any picklable object), in rank order, on every process."""
    size = world()[1]
    if size == 1:
        return [value]
    values: list[Any] = [None] * size
    dist.all_gather_object(values, value)
    return values


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the processes (a parameter without a gradient
    counts as zeros, so every process makes the same optimiser step)."""
    size = world()[1]
    if size == 1:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(size)
