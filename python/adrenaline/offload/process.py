"""Start an attention executor process over a KV pool shared with the caller's process."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import psutil
import setproctitle
import torch
import torch.multiprocessing as mp

from adrenaline.kv_cache.pool import KVPool
from adrenaline.transport import create_transport

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120


def _run(
    pool_tensors: tuple[list, list], heads: tuple[int, int], backend: str, transport: tuple, conn
) -> None:
    from sglang.srt.utils.common import kill_itself_when_parent_died

    from adrenaline.offload.executor import AttentionExecutor

    kill_itself_when_parent_died()
    setproctitle.setproctitle("adrenaline::attention_executor")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level="INFO", format="[%(asctime)s adrenaline executor] %(levelname)s %(message)s")
    torch.set_num_threads(1)  # decode attention is memory-bound: one core's bandwidth does
    pool = KVPool.from_tensors(*pool_tensors)
    executor = AttentionExecutor(pool, create_transport(*transport), *heads, backend)
    conn.send(executor.transport.address)
    parent = psutil.Process(os.getppid())
    logger.info(
        "serving at %s: %d KV pages of %d tokens", executor.transport.address, pool.num_pages, pool.page_size
    )
    executor.serve(parent.is_running)


def start_executor(
    pool: KVPool, num_heads: int, num_kv_heads: int, backend: str, transport: tuple[str, str, str | None]
) -> tuple[Any, str]:
    """Spawn the executor over ``pool`` (moved to shared memory on CPU); returns (process, address).

    ``transport`` is ``create_transport``'s arguments: (kind, bind host, advertise host).
    """
    if pool.device.type == "cpu":
        for t in pool.k + pool.v:
            t.share_memory_()
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(
        target=_run,
        args=((pool.k, pool.v), (num_heads, num_kv_heads), backend, transport, child_conn),
        daemon=True,
    )
    proc.start()
    if not parent_conn.poll(STARTUP_TIMEOUT_S):
        proc.kill()
        raise RuntimeError("the attention executor did not start")
    return proc, parent_conn.recv()
