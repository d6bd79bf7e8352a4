"""Prefill throughput while an executor-like attention load holds some of the cores.

A second process runs decode attention without pause (what a busy attention executor does) on
``x`` cores with ``x`` threads; the prefill runs on the other cores. The curve, prefill tokens/s
vs ``x``, is what the colocation share trades against the executor's speed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.multiprocessing as mp

from adrenaline.attention import create_backend
from adrenaline.kv_cache.pool import KVPool
from adrenaline.profile.measure import PAGE, decode_batch

LOAD_BATCH, LOAD_CONTEXT = 16, 16 * 1024


def _load(conn, heads: tuple[int, int, int], dtype: torch.dtype) -> None:
    """Attend over and over on the cores last asked for; idle (blocked on the pipe) when asked 0."""
    h, hkv, d = heads
    shape = (-(-LOAD_CONTEXT // PAGE) + LOAD_BATCH + 1, PAGE, hkv, d)
    pool = KVPool.from_tensors([torch.zeros(shape, dtype=dtype)], [torch.zeros(shape, dtype=dtype)])
    backend = create_backend("torch", pool, h, hkv, d)
    batch = decode_batch(LOAD_BATCH, LOAD_CONTEXT, torch.device("cpu"))
    q, kv = torch.randn(LOAD_BATCH, h, d, dtype=dtype), torch.randn(LOAD_BATCH, hkv, d, dtype=dtype)
    backend.plan(batch)
    cores: list[int] = []
    with torch.inference_mode():
        while True:
            if not cores or conn.poll():
                cores = conn.recv()
                if cores is None:
                    return
                if cores:
                    os.sched_setaffinity(0, cores)
                    torch.set_num_threads(len(cores))
                conn.send("ok")
                continue
            backend.forward(0, q, kv, kv)


@contextmanager
def attention_load(heads: tuple[int, int, int], dtype: torch.dtype):
    """Yields ``hold(cores)``: the load process then attends on ``cores`` (``[]``: idles)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_load, args=(child, heads, dtype), daemon=True)
    proc.start()

    def hold(cores: list[int]) -> None:
        parent.send(cores)
        if not parent.poll(120):
            raise RuntimeError("the attention load process did not answer")
        parent.recv()

    try:
        yield hold
    finally:
        parent.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.kill()


@contextmanager
def pinned(cores: list[int]):
    """Run this process's torch work on ``cores`` only, restoring its affinity and threads after."""
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


def prefill_under_load(
    prefill: Callable[[], float], heads: tuple[int, int, int], dtype: torch.dtype, cores: list[int]
) -> tuple[list[int], list[float]]:
    """``prefill()`` (tokens/s) with the load on the last x of ``cores``, x = 0 .. len(cores) - 1."""
    xs, ys = [], []
    with attention_load(heads, dtype) as hold:
        for x in range(len(cores)):
            split = len(cores) - x
            hold(cores[split:])
            with pinned(cores[:split]):
                ys.append(prefill())
            xs.append(x)
        hold([])
    return xs, ys
