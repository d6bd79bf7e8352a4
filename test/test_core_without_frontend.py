"""The engine core (model runner, KV cache, attention backends, offload executor and client, the
standard-library and NCCL transports, CUDA graph runner) imports and decodes greedily, tokens equal
to HF transformers, with SGLang, FlashInfer, pyzmq, xgrammar and setproctitle hidden: what a bare
GPU image holds, plus msgspec (the offload and PD protocols' typed messages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HIDDEN = ["sglang", "flashinfer", "zmq", "xgrammar", "setproctitle"]
HERE = Path(__file__).parent

# None in sys.modules makes ``import x`` fail and ``importlib.util.find_spec(x)`` return None, as
# for a package that is not installed.
SITECUSTOMIZE = f"import sys\nfor name in {HIDDEN!r}:\n    sys.modules[name] = None\n"


def test_engine_core_runs_without_the_front_end(tmp_path, tiny_model_factory):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(HERE), env.get("PYTHONPATH", "")])
    model = tiny_model_factory("llama")
    proc = subprocess.run(
        [sys.executable, str(HERE / "core_without_frontend.py"), model],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["equal"] == {"torch": True, "triton": True, "offloaded": True}, result


def test_hidden_packages_are_really_hidden(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = f"import importlib.util as u\nfor n in {HIDDEN!r}:\n    assert u.find_spec(n) is None, n\n"
    code += "try:\n    import zmq\nexcept ImportError:\n    print('blocked')\n"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "blocked", out.stderr
