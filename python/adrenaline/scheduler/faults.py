"""Fault isolation: an exception while serving some requests fails those requests, not the server.

The scheduler runs each per-request piece of a step (prompt logprobs, sampling, taking a token)
through ``guard``; a failure ends that request with HTTP 500 naming the error, and the scheduler
frees its KV like any finished request's. A failed forward pass cannot be pinned on one request,
so it fails every request of its batch. Errors after which nothing can be served correctly (a
corrupted KV pool, a lost device) are re-raised: the scheduler process exits with a clear log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from adrenaline.core.request import finish_abort
from adrenaline.kv_cache.allocator import KVPoolCorrupted
from adrenaline.sampling.sampler import SampleOutput, SampleRow

if TYPE_CHECKING:
    from adrenaline.core.request import Req

logger = logging.getLogger(__name__)

# Device errors leave the CUDA context unusable; torch < 2.8 raises them as plain RuntimeError.
DEVICE_LOST_MARKERS = ("CUDA error", "device-side assert", "NCCL error", "CUBLAS_STATUS")


def is_fatal(exc: BaseException) -> bool:
    if isinstance(exc, KVPoolCorrupted):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return any(m in str(exc) for m in DEVICE_LOST_MARKERS)


def _raise_if_fatal(exc: Exception, where: str) -> None:
    if is_fatal(exc):
        logger.critical("fatal error %s, the scheduler exits: %r", where, exc)
        raise exc


def _internal_error(exc: Exception) -> dict:
    return finish_abort(f"internal error serving this request: {type(exc).__name__}: {exc}", 500)


def fail(req: Req, exc: Exception) -> None:
    """End ``req`` with HTTP 500 for ``exc``; re-raise ``exc`` when nothing can be served after it."""
    _raise_if_fatal(exc, f"while serving request {req.rid}")
    logger.error("request %s failed: %r", req.rid, exc, exc_info=exc)
    req.finished_reason = _internal_error(exc)


def fail_batch(reqs: list[Req], exc: Exception) -> None:
    """``fail`` for every request of a forward pass that raised, logged once."""
    _raise_if_fatal(exc, "in a forward pass")
    logger.error("a forward pass failed: its %d requests fail: %r", len(reqs), exc, exc_info=exc)
    for req in reqs:
        req.finished_reason = _internal_error(exc)


def guard(req: Req, fn: Callable[..., object], *args: object) -> bool:
    """Run ``fn(*args)`` for ``req``; on an exception fail ``req`` and return False."""
    try:
        fn(*args)
    except Exception as e:
        fail(req, e)
        return False
    return True


def sample_isolated(
    sampler: Callable[[torch.Tensor, list[SampleRow]], SampleOutput],
    logits: torch.Tensor,
    sample_rows: list[int],
    reqs: list[Req],
    rows: list[SampleRow],
) -> list[tuple | None]:
    """(token, logprob, top logprobs) per request, None for the requests that failed.

    The rows are sampled as one batch; only when that raises is each row sampled alone, to find
    the request at fault. The sampler gets copies (advanced indexing), so ``logits`` stays intact.
    """
    try:
        out = sampler(logits[sample_rows], rows)
        return list(zip(out.token_ids, out.logprobs, out.top_logprobs))
    except Exception as e:
        _raise_if_fatal(e, "while sampling")
        logger.warning("batched sampling failed (%r): sampling its %d rows one by one", e, len(rows))
    results: list[tuple | None] = []
    for r, req, row in zip(sample_rows, reqs, rows):
        try:
            out = sampler(logits[[r]], [row])
            results.append((out.token_ids[0], out.logprobs[0], out.top_logprobs[0]))
        except Exception as e:
            fail(req, e)
            results.append(None)
    return results
