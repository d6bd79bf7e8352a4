"""Which incarnation of each prefill instance a decode instance talks to.

A prefill instance registers its transport address in its bootstrap server at every start, and
that address (a random port per start) names the incarnation. A watcher thread re-reads the
address of every bootstrap server in use, off the scheduler loop (a stopped prefill instance must
not stall it), and reports each new incarnation once, so the decode side drops what belonged to
the old one at once instead of after ``--pd-timeout``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from adrenaline.disaggregation.bootstrap import lookup_prefill

Bootstrap = tuple[str, int]


@dataclass(frozen=True)
class Restart:
    bootstrap: Bootstrap
    old: str  # the old incarnation's transport address
    new: str
    old_seen: float  # when the old incarnation last answered (monotonic)


class PrefillDirectory:
    """Transport address per bootstrap server, refreshed in the background every ``interval_s``."""

    def __init__(
        self, lookup: Callable[[str, int], str] = lookup_prefill, interval_s: float | None = 0.5
    ) -> None:
        self.lookup = lookup
        self._addresses: dict[Bootstrap, tuple[str, float]] = {}  # -> (address, last confirmed)
        self._restarts: list[Restart] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if interval_s is not None:
            args = (interval_s,)
            threading.Thread(target=self._watch, args=args, name="prefill-watch", daemon=True).start()

    def address(self, bootstrap: Bootstrap) -> str:
        """The cached address, or a lookup now (OSError when the bootstrap server cannot tell)."""
        known = self.cached(bootstrap)
        if known is not None:
            return known
        self.learn(bootstrap, self.lookup(*bootstrap))
        return self._addresses[bootstrap][0]

    def cached(self, bootstrap: Bootstrap) -> str | None:
        """The address known without asking (None: not looked up yet)."""
        with self._lock:
            known = self._addresses.get(bootstrap)
        return known[0] if known is not None else None

    def learn(self, bootstrap: Bootstrap, address: str) -> None:
        """Record what the bootstrap server answered; a new address is a restart."""
        now = time.monotonic()
        with self._lock:
            known = self._addresses.get(bootstrap)
            if known is not None and known[0] != address:
                self._restarts.append(Restart(bootstrap, known[0], address, known[1]))
            self._addresses[bootstrap] = (address, now)

    def restarts(self) -> list[Restart]:
        """New incarnations seen since the last call."""
        with self._lock:
            out, self._restarts = self._restarts, []
        return out

    def refresh(self) -> None:
        """Ask every known bootstrap server again (unreachable ones keep their last answer)."""
        with self._lock:
            known = list(self._addresses)
        for bootstrap in known:
            try:
                self.learn(bootstrap, self.lookup(*bootstrap))
            except OSError:
                pass  # down, stopped or restarting: its new address will tell

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
