"""Start an attention executor process over a KV pool shared with the caller's process."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any

import torch
import torch.multiprocessing as mp

from adrenaline.kv_cache.pool import KVPool
from adrenaline.procs import die_with_parent
from adrenaline.transport import create_transport

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120
# Above the prefill's priority, where the OS allows it: the executor's work is a decode step's
# attention (latency: every offloaded stream's TPOT waits on it) and small; the prefill beside it
# on the same cores is throughput work and takes the rest. The CPU analogue of giving decode
# attention its SM share first.
EXECUTOR_NICE = -5  # relative to the prefill's niceness
MPS_SHARE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def _die_with_parent() -> None:
    """Killed with the prefill scheduler that started it (SGLang or not); named where setproctitle
    is installed."""
    die_with_parent()
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle("adrenaline::attention_executor")


def _raise_priority() -> str:
    """``EXECUTOR_NICE`` levels above the prefill that started it (needs CAP_SYS_NICE, as root in a
    container has); what it got, for the log."""
    try:
        os.nice(EXECUTOR_NICE)
    except OSError:
        return f"nice {os.getpriority(os.PRIO_PROCESS, 0)}: not allowed to run above the prefill"
    return f"nice {os.getpriority(os.PRIO_PROCESS, 0)}"


def _run(
    pool_tensors: tuple[list, list],
    heads: tuple[int, int],
    backend: str,
    transport: tuple,
    threads: int,
    mooncake: tuple | None,
    conn,
) -> None:
    from adrenaline.offload.executor import AttentionExecutor
    from adrenaline.transport.mooncake_engine import MooncakeEngine

    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level="INFO", format="[%(asctime)s adrenaline executor] %(levelname)s %(message)s")
    torch.set_num_threads(threads)  # decode attention is memory-bound: one core's bandwidth may do
    priority = _raise_priority()
    pool = KVPool.from_tensors(*pool_tensors)
    engine = MooncakeEngine(*mooncake) if mooncake is not None else None
    executor = AttentionExecutor(pool, create_transport(*transport), *heads, backend, engine)
    conn.send(executor.transport.address)
    parent = os.getppid()
    logger.info(
        "serving at %s: %d KV pages of %d tokens (SM share %s%%, %s)",
        executor.transport.address,
        pool.num_pages,
        pool.page_size,
        os.environ.get(MPS_SHARE_ENV, "100"),
        priority,
    )
    executor.serve(lambda: os.getppid() == parent)


@contextlib.contextmanager
def _child_env(name: str, value: str | None):
    """``os.environ[name] = value`` while a child process is spawned (it copies the environment)."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def start_executor(
    pool: KVPool,
    num_heads: int,
    num_kv_heads: int,
    backend: str,
    transport: tuple[str, str, str | None],
    sm_percent: int | None = None,
    threads: int = 1,
    mooncake: tuple[str, str, str, float] | None = None,
) -> tuple[Any, str]:
    """Spawn the executor over ``pool`` (moved to shared memory on CPU); returns (process, address).

    ``transport`` is ``create_transport``'s arguments: (kind, bind host, advertise host);
    ``mooncake`` a ``MooncakeEngine``'s (host, protocol, device, timeout), to serve decode
    instances on other hosts over it.
    ``sm_percent``: the executor's SM share under MPS (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, read
    when the child initialises CUDA, which it does first thing: unpickling the pool's IPC handles).
    Without an MPS daemon the variable is ignored and the executor time-shares the GPU.
    ``threads``: its torch threads on CPU (its cores, when pinned: ``offload/colocation.py``).
    """
    if sm_percent is not None and not 0 < sm_percent <= 100:
        raise ValueError("--executor-sm-percent must be in (0, 100]")
    if pool.device.type == "cpu":
        for t in pool.k + pool.v:
            t.share_memory_()
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(
        target=_run,
        args=((pool.k, pool.v), (num_heads, num_kv_heads), backend, transport, threads, mooncake, child_conn),
        daemon=True,
    )
    with _child_env(MPS_SHARE_ENV, None if sm_percent is None else str(sm_percent)):
        proc.start()
    if not parent_conn.poll(STARTUP_TIMEOUT_S):
        proc.kill()
        raise RuntimeError("the attention executor did not start")
    return proc, parent_conn.recv()
