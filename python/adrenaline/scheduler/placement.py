"""Where a request's KV and attention live: the scheduler's one declared seam for it.

The scheduler asks its ``Placement`` at admission (``place``, for a request whose prompt KV is
computed by another instance) and every step (``is_local``, then ``remote`` for the step's remote
group); it never looks at where a remote request lives. The default keeps everything in this
instance's pages. A decode instance that lends attention to executors plugs in its own Placement,
which owns the policy, the executors and the load view behind these calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adrenaline.attention.base import RemoteAttention
from adrenaline.core.request import Req


@dataclass
class LocalLoad:
    """This instance's side of the load, as the scheduler sees it when placing a request."""

    requests: int  # running here, or admitted with their KV on its way (remote ones included)
    free_pages: int  # KV pages free in this instance's pool
    page_size: int
    context: int = 0  # KV tokens of the requests running here (the local attention's work)
    # whether the request being placed would be admitted here now, kept local: its prompt's pages
    # are free and, beside running requests, their headroom too (a placement may keep it local then)
    fits: bool = False


class Placement:
    """Every request's KV and attention here. Subclasses keep some elsewhere.

    A remote request holds no pages here and needs no headroom; its group's attention is computed
    by the ``RemoteAttention`` that ``remote`` returns, which raises ``RemoteAttentionError`` when
    it cannot; the scheduler then retracts the group and recomputes it here.
    """

    def place(self, req: Req, load: LocalLoad) -> bool:
        """At admission of a request whose prompt KV another instance computes: True to leave its
        KV and attention there (it then holds no pages here)."""
        return False

    def attach(self, req: Req, home: str | None) -> None:
        """The request's prompt KV is where ``place`` put it; ``home`` is the remote side's
        address (None when the KV came here)."""

    def is_local(self, req: Req) -> bool:
        return True

    def remote(self, reqs: list[Req]) -> RemoteAttention:
        """The attention of this step's remote group, ``reqs`` in batch order."""
        raise NotImplementedError("no request is placed remotely")

    def failed(self, reqs: list[Req], error: Exception) -> None:
        """The remote group of a step could not be computed: ``reqs`` are recomputed here."""

    def keep_local(self, req: Req) -> None:
        """The remote side refused ``req``: place it here when it is admitted again."""

    def release(self, req: Req) -> None:
        """``req`` left the scheduler (finished, aborted, retracted): free what it holds elsewhere."""

    def tick(self) -> None:
        """Housekeeping once per loop iteration, with or without a step (e.g. batched frees)."""

    def settable(self) -> dict[str, Callable[[Any], None]]:
        """Settings changeable live (``/set_internal_state``): name -> setter (ValueError: refused)."""
        return {}

    def info(self) -> dict[str, Any] | None:
        """What ``/server_info`` reports about placement (None: nothing to report)."""
        return None
