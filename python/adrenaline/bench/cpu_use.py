"""CPU time per streamed token of each process a served stream passes through, by role.

On a CPU deployment every process shares the cores: the decode scheduler's steps, but also the
HTTP front end (SGLang's server and TokenizerManager), its detokenizer, the router and, in a
benchmark, the client. The capacity planner prices the part that is not the scheduler's from
these figures (``docs/sim.md``). Roles are told apart by the titles the processes set
(``sglang::scheduler``, ``sglang::detokenizer``, ``adrenaline::attention_executor``) and by
command line, each under its instance (``single``, ``prefill``, ``decode``).

Snapshots are taken while the servers are up, so only long-lived processes are seen; the
benchmark client, which starts and ends inside a run, reports its own CPU after its imports
(``bench.client``).
"""

from __future__ import annotations

import psutil

TITLES = {
    "sglang::scheduler": "scheduler",
    "sglang::detokenizer": "detokenizer",
    "adrenaline::attention_executor": "executor",
}


def _flag(cmdline: list[str], flag: str) -> str | None:
    """The value given to ``flag`` on a command line (None: not given)."""
    i = cmdline.index(flag) + 1 if flag in cmdline else len(cmdline)
    return cmdline[i] if i < len(cmdline) else None


def _mode(cmdline: list[str]) -> str:
    return _flag(cmdline, "--disaggregation-mode") or "single"


def snapshot() -> dict[str, float]:
    """CPU seconds (user + system) so far of every serving process on this machine, by role."""
    procs = {}
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "cpu_times"]):
        info = p.info
        if info["cpu_times"] is not None:
            procs[info["pid"]] = info
    out: dict[str, float] = {}

    def instance(pid: int) -> str | None:
        """The mode of the ``launch_server`` process ``pid`` descends from, if any."""
        while pid in procs:
            cmd = procs[pid]["cmdline"] or []
            if "adrenaline.launch_server" in cmd:
                return _mode(cmd)
            pid = procs[pid]["ppid"]
        return None

    for info in procs.values():
        cmd = info["cmdline"] or []
        title = " ".join(cmd).strip()
        if "adrenaline.launch_server" in cmd:
            role = f"{_mode(cmd)} frontend"
        elif title in TITLES and (mode := instance(info["ppid"])) is not None:
            role = f"{mode} {TITLES[title]}"
        elif "sglang_router.launch_router" in cmd or title == "sglang::router":
            role = "router"
        else:
            continue
        out[role] = out.get(role, 0.0) + info["cpu_times"].user + info["cpu_times"].system
    return out


def per_token_ms(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """Each role's CPU milliseconds per output token between two snapshots (roles in both)."""
    n = max(tokens, 1)
    return {role: round((after[role] - before[role]) * 1e3 / n, 4) for role in after if role in before}


def summary(cpu: dict[str, float]) -> str:
    """One line: CPU ms per output token by role, largest first."""
    parts = sorted(cpu.items(), key=lambda kv: -kv[1])
    return "CPU ms per output token: " + ", ".join(f"{role} {ms:.3f}" for role, ms in parts)


def cores_of(port: int) -> int:
    """How many cores the ``launch_server`` serving ``port`` may run on (0: not found here)."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "adrenaline.launch_server" in cmd and _flag(cmd, "--port") == str(port):
            try:
                return len(p.cpu_affinity())
            except psutil.Error:
                return 0
    return 0
