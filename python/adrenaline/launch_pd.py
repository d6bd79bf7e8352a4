"""``python -m adrenaline.launch_pd``: SGLang's router in PD mode over prefill and decode instances.

Starts ``--prefill`` prefill and ``--decode`` decode instances of ``python -m
adrenaline.launch_server`` on this machine (each pinned to its CPU cores or GPU when asked), waits
until they are healthy, then runs ``sglang_router.launch_router --pd-disaggregation`` in front of
them. Arguments after ``--`` go to every instance. Ctrl-C or SIGTERM stops everything; so does
the death of any one process. For instances on other hosts, start them yourself and pass their
URLs with ``--prefill-url``/``--decode-url``: only the router is started then (docs/pd.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from adrenaline.procs import free_port, spawn

HEALTH_TIMEOUT_S = 600
Instance = tuple[str, list[str], dict]  # name, command, extra environment


@dataclass
class Cluster:
    """The processes of one PD deployment; ``stop`` ends them all."""

    log_dir: str | None = None  # each process's output goes to NAME.log here (else to ours)
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        print(f"[launch_pd] {name}: {' '.join(cmd)}", flush=True)
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        log = open(os.path.join(self.log_dir, f"{name}.log"), "w") if self.log_dir else None  # noqa: SIM115
        err = subprocess.STDOUT if log else None
        proc = spawn(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=err)
        self.procs.append((name, proc))

    def dead(self) -> str | None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self, timeout_s: float = 20) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_healthy(cluster: Cluster, urls: list[str], timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Block until every URL answers /health with 200; RuntimeError if a process dies first."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        if (why := cluster.dead()) is not None:
            raise RuntimeError(why)
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {timeout_s:.0f} s: {pending}")
        try:
            with urllib.request.urlopen(f"{pending[0]}/health", timeout=2) as r:
                if r.status == 200:
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(1)


def wait_serving(cluster: Cluster, url: str, timeout_s: float = 120) -> None:
    """Until a 1-token request through the router succeeds: it needs its workers marked healthy."""
    body = json.dumps({"text": "hi", "sampling_params": {"max_new_tokens": 1}}).encode()
    deadline = time.monotonic() + timeout_s
    while True:
        if (why := cluster.dead()) is not None:
            raise RuntimeError(why)
        req = urllib.request.Request(f"{url}/generate", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router at {url} did not serve within {timeout_s:.0f} s")
        time.sleep(1)


def _split(spec: str | None, n: int) -> list[str | None]:
    """``"0,1;2,3"`` -> one entry per instance (cycled); None -> no pinning."""
    if not spec:
        return [None] * n
    parts = spec.split(";")
    return [parts[i % len(parts)] for i in range(n)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adrenaline.launch_pd", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", type=int, default=1, help="prefill instances to start here")
    p.add_argument("--decode", type=int, default=1, help="decode instances to start here")
    p.add_argument(
        "--prefill-url",
        action="append",
        nargs="+",
        default=[],
        metavar="URL [BOOTSTRAP_PORT]",
        help="an already running prefill instance (repeatable): http://h1:30001 8998",
    )
    p.add_argument("--decode-url", action="append", default=[], help="an already running decode instance")
    p.add_argument("--host", default="127.0.0.1", help="where the router and the instances listen")
    p.add_argument("--port", type=int, default=8000, help="the router's port (clients talk to it)")
    p.add_argument("--base-port", type=int, default=30001, help="first instance HTTP port")
    p.add_argument("--bootstrap-port", type=int, default=8998, help="first prefill bootstrap port")
    p.add_argument("--prefill-cpus", help="taskset core lists per prefill instance, ';'-separated: '0;1'")
    p.add_argument("--decode-cpus", help="taskset core lists per decode instance")
    p.add_argument("--prefill-gpus", help="CUDA_VISIBLE_DEVICES per prefill instance, ';'-separated")
    p.add_argument("--decode-gpus", help="CUDA_VISIBLE_DEVICES per decode instance")
    p.add_argument("--log-dir", help="write each instance's output to a file here")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then flags for every instance")
    return p  # fmt: skip


def plan(
    args: argparse.Namespace,
) -> tuple[list[tuple[str, list[str], dict]], list[tuple[str, int]], list[str]]:
    """The instances to start (name, command, env), and the router's prefill and decode lists."""
    extra = [a for a in args.server_args if a != "--"]
    starts: list[Instance] = []
    prefills = [(u[0], int(u[1]) if len(u) > 1 else 8998) for u in args.prefill_url]
    decodes = list(args.decode_url)
    port = args.base_port
    for role, n, cpus, gpus in (
        ("prefill", args.prefill, args.prefill_cpus, args.prefill_gpus),
        ("decode", args.decode, args.decode_cpus, args.decode_gpus),
    ):
        for i, (cpu, gpu) in enumerate(zip(_split(cpus, n), _split(gpus, n))):
            cmd = [sys.executable, "-m", "adrenaline.launch_server", "--host", args.host, "--port", str(port),
                   "--disaggregation-mode", role, *extra]  # fmt: skip
            if role == "prefill":
                cmd += ["--disaggregation-bootstrap-port", str(args.bootstrap_port + i)]
                prefills.append((f"http://{args.host}:{port}", args.bootstrap_port + i))
            else:
                decodes.append(f"http://{args.host}:{port}")
            if cpu is not None:
                cmd = ["taskset", "-c", cpu, *cmd]
            starts.append((f"{role}{i}", cmd, {} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}))
            port += 1
    return starts, prefills, decodes


# The router's defaults check worker health once a minute and keep a circuit open for 60 s, so a
# restarted instance would sit unused for about a minute. These make recovery take seconds: a
# worker is probed every 2 s and back up after 1 good probe; an open circuit (5 failures within
# 30 s) is retried after 5 s. A dead worker refuses the probes and is out after 3 (~6 s). A probe
# may take 10 s, so a busy or briefly starved instance is not taken out (a hung one is, after
# ~30 s): SGLang's /health answers on a one-second poll once the scheduler completes a step, and a
# CPU step can take seconds. At 2 s x 2 the router took a busy, healthy prefill instance out and
# answered 503. docs/pd.md explains each.
ROUTER_RESILIENCE = [
    "--health-check-interval-secs", "2", "--health-check-timeout-secs", "10",
    "--health-failure-threshold", "3", "--health-success-threshold", "1",
    "--cb-failure-threshold", "5", "--cb-success-threshold", "1",
    "--cb-timeout-duration-secs", "5", "--cb-window-duration-secs", "30",
]  # fmt: skip


def router_command(host: str, port: int, prefills: list[tuple[str, int]], decodes: list[str]) -> list[str]:
    """SGLang's router in PD mode over ``prefills`` (url, bootstrap port) and ``decodes``."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
           "--host", host, "--port", str(port), "--prometheus-port", str(free_port()),
           *ROUTER_RESILIENCE]  # fmt: skip
    for url, bport in prefills:
        cmd += ["--prefill", url, str(bport)]
    for url in decodes:
        cmd += ["--decode", url]
    return cmd


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    starts, prefills, decodes = plan(args)
    if not prefills or not decodes:
        build_parser().error("a PD deployment needs at least one prefill and one decode instance")
    cluster = Cluster(args.log_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for name, cmd, env in starts:
            cluster.start(name, cmd, env)
        wait_healthy(cluster, [u for u, _ in prefills] + decodes)
        cluster.start("router", router_command(args.host, args.port, prefills, decodes))
        wait_serving(cluster, f"http://{args.host}:{args.port}")
        print(f"[launch_pd] ready: router at http://{args.host}:{args.port}", flush=True)
        while (why := cluster.dead()) is None:
            time.sleep(1)
        print(f"[launch_pd] {why}: stopping", flush=True)
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:
        print(f"[launch_pd] {e}: stopping", flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
