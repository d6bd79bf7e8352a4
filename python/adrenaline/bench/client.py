"""``python -m adrenaline.bench.client RECORDS.jsonl <sglang.benchmark.serving args>``.

SGLang's serving benchmark, keeping what its ``--output-details`` drops: each request's send
time and end-to-end latency. The capacity planner replays a run from these (``bench.request_log``),
so they must be the client's own timestamps. The request function is wrapped, not copied; the
warmup requests go through it first and are left out (the run's requests are the last
``--num-prompts`` sent).
"""

from __future__ import annotations

import json
import sys

from sglang.benchmark import serving

FIELDS = ("start_time", "latency", "ttft", "prompt_len", "output_len", "success")


def main() -> None:
    path = sys.argv.pop(1)
    outputs = []
    inner = serving.ASYNC_REQUEST_FUNCS["sglang"]

    async def recorded(request_func_input, pbar=None):
        out = await inner(request_func_input=request_func_input, pbar=pbar)
        outputs.append(out)
        return out

    serving.ASYNC_REQUEST_FUNCS["sglang"] = recorded
    num_prompts = int(sys.argv[sys.argv.index("--num-prompts") + 1])
    serving.cli_main()
    runs = sorted(outputs, key=lambda o: o.start_time)[-num_prompts:]
    with open(path, "w") as f:
        f.writelines(json.dumps({k: getattr(o, k) for k in FIELDS}) + "\n" for o in runs)


if __name__ == "__main__":
    main()
