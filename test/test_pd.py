"""PD disaggregation end to end on CPU: prefill and decode instances behind SGLang's real router.

A 1P1D pair (float32, small prefill chunks so long prompts cross in several sends) serves the
module; the oracle is the offline ``Engine``, whose greedy tokens equal HF's (test_engine_oracle).
The last tests kill the prefill instance, then bring a new one up on the same ports. A separate
test runs ``python -m adrenaline.launch_pd`` with two prefill and two decode instances.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import psutil
import pytest
import requests

pytest.importorskip("sglang_router")

from pd_cluster import RouterPair  # noqa: E402
from server_utils import Server, free_port, generate, internal_state, spawn, wait_kv_free  # noqa: E402

from adrenaline.launch_pd import wait_serving  # noqa: E402

TIMEOUT_S = 20  # --pd-timeout of the pair
LENGTHS = [3, 17, 64, 150, 5, 90, 33, 250]


def pd_state(srv: Server) -> dict:
    return internal_state(srv)["disaggregation"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = RouterPair(
        tmp_path_factory.mktemp("pd"),
        ["--pd-timeout", str(TIMEOUT_S), "--chunked-prefill-size", "64"],
        ["--pd-timeout", str(TIMEOUT_S)],
    )
    try:
        p.start()
        yield p
    finally:
        p.stop()


def prompts(n: int) -> list[list[int]]:
    from conftest import random_prompts

    return random_prompts(n, 49152, LENGTHS, seed=3)


def test_concurrent_greedy_matches_single_instance(pair, engine):
    ids = prompts(8)
    sp = [{"temperature": 0, "max_new_tokens": 4 + 3 * i, "ignore_eos": True} for i in range(8)]
    before = pd_state(pair.decode)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: generate(pair.url, input_ids=ids[i], sampling_params=sp[i]), range(8)))
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs if r.status_code != 200]
    want = engine.generate(input_ids=ids, sampling_params=sp)
    assert [r.json()["output_ids"] for r in outs] == [w["output_ids"] for w in want]
    after = pd_state(pair.decode)
    assert after["transfers"] - before["transfers"] == 8 and after["failures"] == before["failures"]
    # every prompt page crossed: 150- and 250-token prompts in several 64-token chunks
    assert after["pages"] - before["pages"] == sum(-(-len(x) // 16) for x in ids)
    assert pd_state(pair.prefill)["bytes_sent"] == pd_state(pair.decode)["bytes_received"] > 0


def test_text_streaming_and_logprobs(pair, engine):
    text = "The capital of France is"
    sp = {"temperature": 0, "max_new_tokens": 8}
    full = generate(pair.url, text=text, sampling_params=sp, return_logprob=True, logprob_start_len=0).json()
    want = engine.generate(text, sp, return_logprob=True, logprob_start_len=0)
    assert full["output_ids"] == want["output_ids"] and full["text"] == want["text"]
    m, w = full["meta_info"], want["meta_info"]
    assert [t[0] for t in m["output_token_logprobs"]] == pytest.approx(
        [t[0] for t in w["output_token_logprobs"]], abs=1e-4
    )
    # prompt logprobs come from the prefill instance, merged by the router
    assert [t[1] for t in m["input_token_logprobs"]] == [t[1] for t in w["input_token_logprobs"]]
    assert [t[0] for t in m["input_token_logprobs"][1:]] == pytest.approx(
        [t[0] for t in w["input_token_logprobs"][1:]], abs=1e-4
    )
    chunks = []
    with requests.post(pair.url + "/generate", json={"text": text, "sampling_params": sp, "stream": True},
                       stream=True, timeout=120) as r:  # fmt: skip
        for line in r.iter_lines():
            if line and line != b"data: [DONE]":
                chunks.append(json.loads(line.removeprefix(b"data: ")))
    assert len(chunks) >= 2 and chunks[-1]["output_ids"] == want["output_ids"]


def test_openai_chat_through_router(pair):
    r = requests.post(pair.url + "/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 16,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "fields,message",
    [
        ({}, "bootstrap_host, bootstrap_port and bootstrap_room"),
        ({"bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": -1}, "bootstrap_room"),
        ({"bootstrap_host": "127.0.0.1", "bootstrap_port": 70000, "bootstrap_room": 1}, "bootstrap_port"),
    ],
)
def test_missing_or_malformed_bootstrap_is_a_client_error(pair, fields, message):
    for srv in (pair.prefill, pair.decode):
        r = generate(srv.url, text="hi", sampling_params={"max_new_tokens": 2}, **fields)
        assert 400 <= r.status_code < 500, r.text
        assert message in r.text
    # warmup/health requests with SGLang's fake bootstrap host are served locally
    r = generate(pair.decode.url, text="hi", sampling_params={"max_new_tokens": 2}, bootstrap_host="2.2.2.2",
             bootstrap_room=0)  # fmt: skip
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2


def _all_free(pair) -> None:
    for srv in (pair.prefill, pair.decode):
        st = wait_kv_free(srv, timeout=TIMEOUT_S + 10)
        assert st["kv_cache"]["num_used_pages"] == 0 and st["disaggregation"]["in_flight"] == 0, st


@pytest.mark.parametrize("after_s", [0.05, 0.6, None])
def test_client_disconnect_frees_kv_on_both_sides(pair, after_s):
    """Disconnect while prefilling (long prompt), around the transfer, or mid-decode (first chunk read)."""
    body = json.dumps({"input_ids": prompts(8)[7] * 3, "stream": True,
                       "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}})  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", pair.port, timeout=120)
    conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
    if after_s is None:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.fp.readline()  # decoding on the decode instance
    else:
        time.sleep(after_s)
    conn.sock.close()
    conn.close()
    _all_free(pair)


def test_kill_prefill_fails_in_flight_then_recovers(pair, engine):
    ids = prompts(4)
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    results: list = []

    def send(x):
        try:
            results.append(generate(pair.url, input_ids=x, sampling_params=sp).status_code)
        except requests.RequestException as e:
            results.append(repr(e))

    def send_stream(x):
        """The decode instance can still speak: its stream ends with an event saying why."""
        body = {"input_ids": x, "sampling_params": sp, "stream": True}
        with requests.post(pair.url + "/generate", json=body, stream=True, timeout=TIMEOUT_S + 60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
        last = events[-1] if events else {"cut": r.status_code}
        results.append(last.get("error") or last.get("meta_info", {}).get("finish_reason") or last)

    # keep the prefill instance busy, then kill it with requests in flight
    slow = threading.Thread(target=send, args=(prompts(8)[7] * 6,))
    slow.start()
    threads = [threading.Thread(target=send, args=(x,)) for x in ids]
    threads.append(threading.Thread(target=send_stream, args=(prompts(8)[6],)))
    for t in threads:
        t.start()
    time.sleep(0.3)
    for p in pair.prefill.tree():
        p.kill()
    tic = time.monotonic()
    for t in [slow, *threads]:
        t.join(TIMEOUT_S + 30)
    assert all(not t.is_alive() for t in [slow, *threads]), "a request hung after its prefill instance died"
    assert any(r != 200 for r in results), results  # the killed ones fail, none hangs
    [reason] = [r for r in results if isinstance(r, dict)]  # the stream's end: finished, or why not
    assert reason.get("type") == "length" or reason.get("message"), reason
    st = wait_kv_free(pair.decode, timeout=TIMEOUT_S + 10)
    assert time.monotonic() - tic < TIMEOUT_S + 30
    assert st["kv_cache"]["num_used_pages"] == 0 and st["disaggregation"]["in_flight"] == 0
    # the decode instance is healthy on its own...
    assert requests.get(pair.decode.url + "/health_generate", timeout=60).status_code == 200
    # ...and serves through the router again once a prefill instance is back on the same ports
    pair.restart("prefill")
    wait_serving(pair.router, pair.url)
    r = generate(pair.url, input_ids=ids[0], sampling_params=sp)
    assert (
        r.status_code == 200
        and r.json()["output_ids"] == engine.generate(input_ids=ids[0], sampling_params=sp)["output_ids"]
    )


def test_two_prefill_two_decode_via_launch_pd(tmp_path, engine):
    port = free_port()
    base = free_port()
    cmd = [sys.executable, "-m", "adrenaline.launch_pd", "--prefill", "2", "--decode", "2",
           "--port", str(port), "--base-port", str(base), "--bootstrap-port", str(free_port()),
           "--log-dir", str(tmp_path), "--", "--dtype", "float32", "--max-total-tokens", "4096",
           "--pd-timeout", str(TIMEOUT_S)]  # fmt: skip
    log = open(tmp_path / "launch_pd.log", "w")  # noqa: SIM115
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # four instances on two cores
    proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        logged = lambda: (tmp_path / "launch_pd.log").read_text()
        while "ready: router" not in logged():  # launch_pd has served a request through it
            assert proc.poll() is None and time.monotonic() < deadline, logged()
            time.sleep(1)
        ids = prompts(8)
        sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda x: generate(url, input_ids=x, sampling_params=sp), ids))
        assert all(r.status_code == 200 for r in outs)
        want = engine.generate(input_ids=ids, sampling_params=sp)
        assert [r.json()["output_ids"] for r in outs] == [w["output_ids"] for w in want]
        decodes = [SimpleNamespace(url=f"http://127.0.0.1:{base + i}") for i in (2, 3)]
        assert sum(pd_state(d)["transfers"] for d in decodes) >= 8
    finally:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=60)
        for p in alive:
            p.kill()
        log.close()
    assert alive == [], [p.info for p in alive]
