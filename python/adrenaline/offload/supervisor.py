"""Keeps a prefill instance's attention executor running.

The prefill scheduler loop asks ``poll`` every iteration: a dead executor process is reaped at once
(``is_alive`` waits on it without blocking) and its link marked down, so offload asks are refused
and requests stay local; a new executor is started after a backoff, in a thread (a start takes
seconds, the loop must not wait; the thread then waits on the new process, whose parent-death
signal fires when the thread that forked it exits), and the link then points at it. Decode
instances learn its new address from the next ``KVDone`` of an offloaded request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from adrenaline.offload.link import ExecutorLink

logger = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # before the n-th respawn in a row
STABLE_S = 60.0  # an executor that lived this long resets the backoff

Start = Callable[[], tuple[Any, str]]  # -> (process, transport address)


class ExecutorSupervisor:
    def __init__(self, start: Start, proc: Any, link: ExecutorLink) -> None:
        self.start = start
        self.proc = proc
        self.link = link
        link.watch = self.poll
        self._failures = 0  # deaths in a row, for the backoff
        self._started_at = time.monotonic()
        self._respawn_at: float | None = None
        self._starting: threading.Thread | None = None
        self._started: tuple[Any, str] | None = None
        self._closed = False

    def poll(self) -> None:
        if self.proc is not None and not self.proc.is_alive():
            self._died()
        if self._respawn_at is not None and time.monotonic() >= self._respawn_at:
            self._respawn_at = None
            self._starting = threading.Thread(target=self._spawn, name="executor-respawn", daemon=True)
            self._starting.start()
        if self._started is not None:
            (self.proc, address), self._started = self._started, None
            self._started_at = time.monotonic()
            logger.info("attention executor restarted at %s", address)
            self.link.restarted(address)

    def _died(self) -> None:
        code = self.proc.exitcode
        self.proc.join(0)  # already reaped by is_alive; releases the process object's resources
        self.proc = None
        lived = time.monotonic() - self._started_at
        self._failures = 0 if lived > STABLE_S else self._failures + 1
        delay = self._backoff()
        logger.error("attention executor exited (code %s): requests stay local; restart in %g s", code, delay)
        self.link.lost()

    def _backoff(self) -> float:
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        self._respawn_at = time.monotonic() + delay
        return delay

    def _spawn(self) -> None:
        try:
            started = self.start()
        except Exception as e:  # noqa: BLE001 - a failed start is retried after the next backoff
            logger.error("attention executor did not restart: %s", e)
            self._failures += 1
            self._backoff()
            return
        if self._closed:
            started[0].terminate()
            return
        self._started = started
        # The executor dies with the thread that started it (PR_SET_PDEATHSIG is per thread):
        # this thread lives as long as it does.
        started[0].join()

    def terminate(self) -> None:
        self._closed = True
        if self.proc is not None:
            self.proc.terminate()
