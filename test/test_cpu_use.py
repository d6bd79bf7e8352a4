"""``bench.cpu_use``: the CPU each serving role spends, told apart as on a real deployment (the
titles SGLang's and our processes set, under the ``launch_server`` they descend from), and the
benchmark client's start barrier."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from adrenaline.bench.client import wait_for_start
from adrenaline.bench.cpu_use import cores_of, per_token_ms, snapshot

# A stand-in server: a process whose command line names launch_server in decode mode, with a child
# titled as SGLang's detokenizer that burns ~BUSY s of CPU, then both wait to be killed.
BUSY = 0.6
CHILD = f"""
import setproctitle, time
setproctitle.setproctitle("sglang::detokenizer")
t = time.process_time()
while time.process_time() - t < {BUSY}:
    pass
print("done", flush=True)
time.sleep(60)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
time.sleep(60)
"""


def test_roles_are_told_apart_and_the_cpu_is_charged_to_its_instance():
    before = snapshot()
    server = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-c",
            PARENT,
            CHILD,
            "adrenaline.launch_server",
            "--port",
            "47123",
            "--disaggregation-mode",
            "decode",
            "--disaggregation-bootstrap-port",
            "47125",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "done"
        after = snapshot()
        assert cores_of(47123) == 1 and cores_of(47124) == 0
        assert cores_of(47125) == 0  # another port flag's value is not the server's port
    finally:
        subprocess.run(["pkill", "-P", str(server.pid)])
        server.kill()
        server.wait()
    used = after["decode detokenizer"] - before.get("decode detokenizer", 0.0)
    assert BUSY * 0.9 <= used < BUSY + 0.5
    assert "decode frontend" in after
    per = per_token_ms({"decode detokenizer": 0.0}, {"decode detokenizer": used}, 100)
    assert abs(per["decode detokenizer"] - used * 10) < 1e-3  # ms per token


def test_clients_wait_for_the_common_start_then_their_own_delay(tmp_path):
    start = str(tmp_path / "start")
    began: list[float] = []
    t = threading.Thread(target=lambda: (wait_for_start(start, 0.3), began.append(time.time())))
    t.start()
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob("start.ready.*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert not began  # ready, still waiting for the start
    t0 = time.time()
    (tmp_path / "start").write_text(repr(t0))
    t.join(5)
    assert began and began[0] >= t0 + 0.3 - 0.01
