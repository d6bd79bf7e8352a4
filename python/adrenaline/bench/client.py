"""``python -m adrenaline.bench.client RECORDS.jsonl <sglang.benchmark.serving args>``.

SGLang's serving benchmark, keeping what its ``--output-details`` drops: each request's send
time and end-to-end latency. The capacity planner replays a run from these (``bench.request_log``),
so they must be the client's own timestamps. The request function is wrapped, not copied; the
warmup requests go through it first and are left out (the run's requests are the last
``--num-prompts`` sent). A last line gives the client's CPU seconds from its first request on
(``{"client_cpu_s": ...}``; its imports, ~10 s of CPU, come before and are left out).

Clients run together (``bench.sweep``'s streams) start in step with ``--start-file F --delay S``:
each, once imported, says so (``F.ready.<pid>``), waits for F to hold the common start time and
begins S seconds after it, so no client's imports land inside another's run.
"""

from __future__ import annotations

import json
import os
import sys
import time

from sglang.benchmark import serving

FIELDS = ("start_time", "latency", "ttft", "prompt_len", "output_len", "success")


def _pop(flag: str) -> str | None:
    if flag not in sys.argv:
        return None
    i = sys.argv.index(flag)
    value = sys.argv[i + 1]
    del sys.argv[i : i + 2]
    return value


def wait_for_start(start_file: str, delay: float) -> None:
    open(f"{start_file}.ready.{os.getpid()}", "w").close()
    while not os.path.exists(start_file):
        time.sleep(0.01)
    with open(start_file) as f:
        t0 = float(f.read())
    time.sleep(max(t0 + delay - time.time(), 0.0))


def main() -> None:
    path = sys.argv.pop(1)
    start_file, delay = _pop("--start-file"), float(_pop("--delay") or 0.0)
    if start_file:
        wait_for_start(start_file, delay)
    outputs = []
    cpu0: list[float] = []  # the process's CPU time at its first request
    inner = serving.ASYNC_REQUEST_FUNCS["sglang"]

    async def recorded(request_func_input, pbar=None):
        if not cpu0:
            cpu0.append(time.process_time())
        out = await inner(request_func_input=request_func_input, pbar=pbar)
        outputs.append(out)
        return out

    serving.ASYNC_REQUEST_FUNCS["sglang"] = recorded
    num_prompts = int(sys.argv[sys.argv.index("--num-prompts") + 1])
    serving.cli_main()
    runs = sorted(outputs, key=lambda o: o.start_time)[-num_prompts:]
    with open(path, "w") as f:
        f.writelines(json.dumps({k: getattr(o, k) for k in FIELDS}) + "\n" for o in runs)
        f.write(json.dumps({"client_cpu_s": time.process_time() - cpu0[0] if cpu0 else 0.0}) + "\n")


if __name__ == "__main__":
    main()
