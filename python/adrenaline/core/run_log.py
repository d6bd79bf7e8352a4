"""A benchmark run's request log: the format ``bench.*`` writes (``--request-log``) and the
capacity planner (``sim``) replays. A core type, like the offload profile, so both tools read it
without importing each other.

JSONL, appended to; each run is a header line then one line per request::

    {"run": "plain PD", "deployment": {...}, "measured": {...}}
    {"sent": 0.0, "input_len": 32, "output_len": 256, "ttft": 0.41, "finish": 9.8}

Times are seconds from the run's first send. ``deployment`` is what rebuilds the cluster (xPyD,
pools, page size, running cap, chunk budget, the client's concurrency, the offload policy);
``measured`` holds the benchmark's figures (output throughput, TPOT p50, mean decode batch...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    run: str
    deployment: dict
    measured: dict
    requests: list[dict] = field(default_factory=list)


def append_run(path: str | Path, run: Run) -> None:
    header = {"run": run.run, "deployment": run.deployment, "measured": run.measured}
    with open(path, "a") as f:
        f.writelines(json.dumps(x) + "\n" for x in [header, *run.requests])


def read_runs(path: str | Path) -> list[Run]:
    runs: list[Run] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        if "run" in d:
            runs.append(Run(d["run"], d["deployment"], d["measured"]))
        elif runs:
            runs[-1].requests.append(d)
        else:
            raise ValueError(f"{path}: a request before any run header")
    return runs
