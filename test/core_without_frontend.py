"""Run by ``test_core_without_frontend.py`` in a fresh interpreter whose ``sitecustomize`` hides
the front end's packages (every process it spawns too): the engine core must import and decode
greedily with only torch, transformers, safetensors and msgspec.

    python test/core_without_frontend.py MODEL_DIR
"""

from __future__ import annotations

import json
import sys

from sgl_kernel_ext.triton_ops import interpret_on_cpu


def main(path: str) -> dict:
    interpret_on_cpu()  # before transformers imports triton
    import torch
    from conftest import HFOracle, random_prompts

    import adrenaline.runner.cuda_graph  # noqa: F401  (the GPU pieces import too)
    import adrenaline.transport.nccl_transport  # noqa: F401
    from adrenaline import Engine
    from adrenaline.colocated import ColocatedOffload

    prompts = random_prompts(3, 512, [5, 21, 40], seed=11)
    n = 6
    oracle = HFOracle(path)
    want = [oracle.greedy(p, n, None) for p in prompts]
    params = {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
    got = {}
    engines = {}
    for backend in ("torch", "triton"):
        e = engines[backend] = Engine(
            path, dtype="float32", attention_backend=backend, max_total_tokens=1024, skip_tokenizer_init=True
        )
        got[backend] = [o["output_ids"] for o in e.generate(input_ids=prompts, sampling_params=params)]
    colocated = ColocatedOffload(engines["torch"], transport="socket")
    try:
        got["offloaded"] = colocated.generate(prompts, n, offload={0, 2})
    finally:
        colocated.close()
    return {
        "equal": {k: v == want for k, v in got.items()},
        "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
