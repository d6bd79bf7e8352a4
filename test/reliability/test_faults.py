"""Faults through SGLang's router: a PD pair (prefill with its attention executor, decode offloading
every request) loses its executor, then its prefill instance, to kill -9.

The executor is reaped and respawned, requests in flight finish by local recomputation with the
engine's tokens, and offloading resumes on the new executor. A prefill instance restarted with
the same arguments and bootstrap port serves the first requests after it is healthy, well within
``--pd-timeout``. Afterwards KV, rooms and executor pages are back to zero.
"""

from __future__ import annotations

import json
import time

import psutil
import pytest
import requests

pytest.importorskip("sglang_router")

import server_utils  # noqa: E402
from server_utils import Server, free_port, generate, internal_state, wait_kv_free, wait_until  # noqa: E402

from adrenaline.launch_pd import Cluster, router_command, wait_serving  # noqa: E402

PD_TIMEOUT_S = 60  # what a restarted prefill instance used to cost the first request
SP = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


class Pair:
    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.bootstrap, self.prefill_port = free_port(), free_port()
        self.prefill = self._start_prefill("p0")
        (tmp / "d").mkdir()
        self.decode = Server(
            tmp / "d", "--disaggregation-mode", "decode", "--attention-offload-ratio", "inf",
            "--pd-timeout", str(PD_TIMEOUT_S), "--offload-timeout", "5", threads=1,
        )  # fmt: skip
        self.router = Cluster(str(tmp))
        self.url = f"http://127.0.0.1:{free_port()}"

    def _start_prefill(self, name: str) -> Server:
        (self.tmp / name).mkdir()
        return Server(
            self.tmp / name, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
            str(self.bootstrap), "--enable-attention-offload", "--pd-timeout", str(PD_TIMEOUT_S),
            port=self.prefill_port, threads=1,
        )  # fmt: skip

    def start(self) -> None:
        for srv in (self.prefill, self.decode):
            srv.wait_ready()
        port = int(self.url.rsplit(":", 1)[1])
        prefills = [(self.prefill.url, self.bootstrap)]
        self.router.start("router", router_command("127.0.0.1", port, prefills, [self.decode.url]))
        wait_serving(self.router, self.url, timeout_s=300)

    def restart_prefill(self) -> None:
        """kill -9 of the whole prefill instance, then the same command again."""
        for p in self.prefill.tree():
            p.kill()
        self.prefill.stop(timeout=30)
        self.prefill = self._start_prefill(f"p{time.monotonic_ns()}")
        self.prefill.wait_ready()

    def stop(self) -> None:
        self.router.stop()
        for srv in (self.prefill, self.decode):
            srv.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    server_utils.STARTUP_TIMEOUT_S = 900  # three model loads on a busy machine
    p = Pair(tmp_path_factory.mktemp("faults"))
    try:
        p.start()
        yield p
    finally:
        p.stop()


def executor_state(pair: Pair) -> dict:
    return internal_state(pair.prefill)["disaggregation"]["executor"]


def executors(pair: Pair) -> list[psutil.Process]:
    return [p for p in pair.prefill.tree() if "attention_executor" in " ".join(p.cmdline())]


def assert_clean(pair: Pair) -> None:
    assert wait_kv_free(pair.decode, 60)["kv_cache"]["num_used_pages"] == 0
    assert wait_kv_free(pair.prefill, 60)["kv_cache"]["num_used_pages"] == 0
    d = internal_state(pair.decode)["disaggregation"]
    assert d["in_flight"] == 0 and d["offload"]["offloaded_requests"] == 0
    st = wait_until(lambda: executor_state(pair), lambda st: st.get("used_pages") == 0, 60)
    assert st["used_pages"] == 0 and internal_state(pair.prefill)["disaggregation"]["in_flight"] == 0


def stream(url: str, ids: list[int], on_chunk) -> list[dict]:
    chunks = []
    body = {"input_ids": ids, "sampling_params": SP, "stream": True}
    with requests.post(url + "/generate", json=body, stream=True, timeout=240) as r:
        for line in r.iter_lines():
            if line and line != b"data: [DONE]":
                chunks.append(json.loads(line.removeprefix(b"data: ")))
                on_chunk(len(chunks))
    return chunks


def test_executor_kill_is_reaped_respawned_and_offloading_resumes(pair, engine):
    ids = list(range(300, 330))
    want = engine.generate(input_ids=ids, sampling_params=SP)["output_ids"]
    [old] = executors(pair)
    old_address = executor_state(pair)["address"]

    def kill_at_second_chunk(n: int) -> None:
        if n == 2:
            old.kill()

    chunks = stream(pair.url, ids, kill_at_second_chunk)
    assert chunks[-1]["output_ids"] == want  # recomputed locally after the kill
    st = wait_until(lambda: executor_state(pair), lambda st: st["restarts"] == 1 and not st["down"], 120)
    assert st["restarts"] == 1 and not st["down"]
    zombies = [p for p in pair.prefill.tree() if p.status() == psutil.STATUS_ZOMBIE]
    assert not zombies and old.pid not in [p.pid for p in executors(pair)]
    r = generate(pair.url, input_ids=ids, sampling_params=SP)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == want and r.json()["meta_info"]["attention_offloaded"] == [True]
    info = internal_state(pair.decode)["disaggregation"]["offload"]
    # the dead executor's page counts are gone (the new one is listed once it reports over TCP;
    # over shared memory it reports none)
    assert old_address not in info["executors"] and set(info["executors"]) <= {st["address"]}
    assert info["fallbacks"] >= 1
    assert_clean(pair)


def test_restarted_prefill_serves_the_first_requests(pair, engine):
    ids = list(range(400, 420))
    want = engine.generate(input_ids=ids, sampling_params=SP)["output_ids"]
    pair.restart_prefill()
    tic = time.monotonic()
    wait_serving(pair.router, pair.url, timeout_s=PD_TIMEOUT_S * 2 / 3)  # a stall would take 60 s
    r = generate(pair.url, input_ids=ids, sampling_params=SP)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == want and time.monotonic() - tic < PD_TIMEOUT_S
    assert_clean(pair)
