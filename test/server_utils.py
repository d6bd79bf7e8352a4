"""Live servers for the tests: start ``python -m adrenaline.launch_server``, wait, query, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

from adrenaline.procs import free_port, spawn

STARTUP_TIMEOUT_S = 240


class Server:
    def __init__(
        self,
        tmp: Path,
        *extra: str,
        port: int | None = None,
        threads: int | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        """``threads``: torch threads of the scheduler (several servers on 2 cores: 1 each);
        ``netns``: run it in that network namespace, listening on ``host`` (a test host);
        ``startup_timeout_s``: how long ``wait_ready`` waits (longer where several load at once)."""
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.url = f"http://{host}:{self.port}"
        self.log_path = tmp / "server.log"
        cmd = [
            *(["ip", "netns", "exec", netns] if netns else []),
            sys.executable,
            "-m",
            "adrenaline.launch_server",
            "--host",
            host,
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-total-tokens",
            "8192",
            "--enable-metrics",
            *extra,
        ]
        self.log = open(self.log_path, "w")
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.proc = spawn(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "[adrenaline] ready at" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(1)
        raise RuntimeError(f"server not ready after {self.startup_timeout_s}s:\n{self.log_tail()}")

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 90) -> list[psutil.Process]:
        """SIGTERM the server; return the processes still alive after ``timeout``."""
        procs = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:  # never leave strays behind, even when the test is about to fail
            p.kill()
        self.log.close()
        return alive


def generate(target: Server | str, **body) -> requests.Response:
    """POST /generate to a server (or a URL: a router's)."""
    url = target if isinstance(target, str) else target.url
    return requests.post(url + "/generate", json=body, timeout=180)


def stream_generate(
    url: str, body: dict, on_chunk: Callable[[int], None] = lambda n: None
) -> tuple[list[dict], list[float]]:
    """POST a streaming /generate; its chunks and when each arrived (``time.monotonic``).
    ``on_chunk(n)`` runs after the n-th chunk (a test's fault injection point)."""
    chunks, times = [], []
    with requests.post(url + "/generate", json={**body, "stream": True}, stream=True, timeout=240) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line and line != b"data: [DONE]":
                chunks.append(json.loads(line.removeprefix(b"data: ")))
                times.append(time.monotonic())
                on_chunk(len(chunks))
    return chunks, times


def assert_no_stall(times: list[float], timeout_s: float) -> None:
    """A hang detector, not a performance target: no gap between chunks comes near ``timeout_s``."""
    gap = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    assert gap < timeout_s / 3, f"the stream stalled {gap:.1f} s (the timeout is {timeout_s} s)"


def generate_all(url: str, ids: list[list[int]], sampling_params: list[dict]) -> list[dict]:
    """Send every prompt at once; the replies in order (each must be HTTP 200)."""

    def one(i: int) -> requests.Response:
        return generate(url, input_ids=ids[i], sampling_params=sampling_params[i])

    with ThreadPoolExecutor(len(ids)) as pool:
        outs = list(pool.map(one, range(len(ids))))
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs if r.status_code != 200]
    return [r.json() for r in outs]


def internal_state(server: Server) -> dict:
    return requests.get(server.url + "/server_info", timeout=30).json()["internal_states"][0]


def wait_until(fetch: Callable[[], dict], done: Callable[[dict], bool], timeout: float = 30) -> dict:
    """Poll ``fetch`` until ``done`` holds for its result or ``timeout`` passes; the last result."""
    deadline = time.monotonic() + timeout
    while not done(st := fetch()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return st


def wait_kv_free(server: Server, timeout: float = 30) -> dict:
    def free(st: dict) -> bool:
        idle = st["num_running_reqs"] == 0 and st["num_waiting_reqs"] == 0
        return idle and st["kv_cache"]["num_used_pages"] == 0

    return wait_until(lambda: internal_state(server), free, timeout)
