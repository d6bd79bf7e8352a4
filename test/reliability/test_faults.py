"""Faults through SGLang's router: a PD pair (prefill with its attention executor, decode offloading
every request over shared memory) loses its executor, then each instance is stopped (SIGSTOP),
then the decode and the prefill instance are killed (-9) and restarted, then the executor and the
decode instance are killed while the abort of an offloaded stream is under way.

The executor's death is seen when its process exits, not after ``--offload-timeout``: requests in
flight finish by local recomputation with the engine's tokens, without a stall, and offloading
resumes on the respawned executor. Stopped instances hold their streams, which then complete. A
restarted instance serves the first requests after it is healthy, well within the timeouts.
After each fault KV, rooms and executor pages are back to zero.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import requests

pytest.importorskip("sglang_router")

from pd_cluster import RouterPair  # noqa: E402
from server_utils import assert_no_stall, generate, internal_state, stream_generate, wait_kv_free, wait_until  # noqa: E402

from adrenaline.launch_pd import wait_serving  # noqa: E402

PD_TIMEOUT_S = 60  # what a restarted prefill instance used to cost the first request
OFFLOAD_TIMEOUT_S = 30  # what noticing a dead executor by its silence would cost each stream
SP = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = RouterPair(
        tmp_path_factory.mktemp("faults"),
        ["--enable-attention-offload", "--pd-timeout", str(PD_TIMEOUT_S)],
        ["--attention-offload-ratio", "inf", "--pd-timeout", str(PD_TIMEOUT_S),
         "--offload-timeout", str(OFFLOAD_TIMEOUT_S)],
        startup_timeout_s=900,  # three model loads on a busy machine
    )  # fmt: skip
    try:
        p.start()
        yield p
    finally:
        p.stop()


def executor_state(pair: RouterPair) -> dict:
    return internal_state(pair.prefill)["disaggregation"]["executor"]


def executors(pair: RouterPair) -> list[psutil.Process]:
    return [p for p in pair.prefill.tree() if "attention_executor" in " ".join(p.cmdline())]


def assert_clean(pair: RouterPair) -> None:
    assert wait_kv_free(pair.decode, 60)["kv_cache"]["num_used_pages"] == 0
    assert wait_kv_free(pair.prefill, 60)["kv_cache"]["num_used_pages"] == 0
    d = internal_state(pair.decode)["disaggregation"]
    assert d["in_flight"] == 0 and d["offload"]["offloaded_requests"] == 0
    st = wait_until(lambda: executor_state(pair), lambda st: st.get("used_pages") == 0, 60)
    assert st["used_pages"] == 0 and internal_state(pair.prefill)["disaggregation"]["in_flight"] == 0


def assert_first_request_served_offloaded(pair: RouterPair, ids: list[int], want: list[int]) -> None:
    """After a restart: the router serves within seconds (not the minute its default health checks
    would take), offloaded, with the engine's tokens; then everything is back to zero."""
    wait_serving(pair.router, pair.url, timeout_s=20)
    r = generate(pair.url, input_ids=ids, sampling_params=SP)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == want and r.json()["meta_info"]["attention_offloaded"] == [True]
    assert_clean(pair)


def test_executor_kill_is_reaped_respawned_and_offloading_resumes(pair, engine):
    ids = list(range(300, 330))
    want = engine.generate(input_ids=ids, sampling_params=SP)["output_ids"]
    [old] = executors(pair)
    old_address = executor_state(pair)["address"]

    def kill_at_second_chunk(n: int) -> None:
        if n == 2:
            old.kill()

    chunks, times = stream_generate(pair.url, {"input_ids": ids, "sampling_params": SP}, kill_at_second_chunk)
    assert chunks[-1]["output_ids"] == want  # recomputed locally after the kill
    # the death is seen when the process exits, not after the offload timeout: no stall near it
    assert_no_stall(times[1:], OFFLOAD_TIMEOUT_S)
    st = wait_until(lambda: executor_state(pair), lambda st: st["restarts"] == 1 and not st["down"], 120)
    assert st["restarts"] == 1 and not st["down"]
    zombies = [p for p in pair.prefill.tree() if p.status() == psutil.STATUS_ZOMBIE]
    assert not zombies and old.pid not in [p.pid for p in executors(pair)]
    r = generate(pair.url, input_ids=ids, sampling_params=SP)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == want and r.json()["meta_info"]["attention_offloaded"] == [True]
    info = internal_state(pair.decode)["disaggregation"]["offload"]
    # the dead executor's page counts are gone; the new one reported its own over shared memory
    assert info["exchange"]["shm_executors"] == [st["address"]]
    assert st["address"] != old_address and list(info["executors"]) == [st["address"]]
    assert info["executors"][st["address"]]["num_pages"] > 0
    assert info["fallbacks"] >= 1
    assert_clean(pair)


def pids(pair: RouterPair, target: str) -> list[psutil.Process]:
    return executors(pair) if target == "executor" else getattr(pair, target).tree()


@pytest.mark.parametrize("target", ["executor", "decode", "prefill"])
def test_a_stopped_instance_holds_its_stream_which_then_completes(pair, engine, target):
    """SIGSTOP for 3 s, below every timeout: the executor and the decode instance mid-decode, the
    prefill instance (whole tree) just after the request went out (its prompt, then its KV, in
    flight). After SIGCONT the stream completes with the engine's tokens, with no fallback."""
    wait_serving(pair.router, pair.url)
    ids = list(range(500, 530))
    want = engine.generate(input_ids=ids, sampling_params=SP)["output_ids"]
    fallbacks = internal_state(pair.decode)["disaggregation"]["offload"]["fallbacks"]
    stopped = pids(pair, target)
    assert stopped

    def pause() -> None:
        for p in stopped:
            p.suspend()
        time.sleep(3)
        for p in stopped:
            p.resume()

    timer = threading.Timer(0.2, pause) if target == "prefill" else None
    body = {"input_ids": ids, "sampling_params": SP}
    try:
        if timer is not None:
            timer.start()
        chunks, _ = stream_generate(pair.url, body, lambda n: n == 2 and timer is None and pause())
    finally:
        if timer is not None:
            timer.join()
        for p in stopped:
            p.resume()
    assert chunks[-1]["output_ids"] == want
    assert internal_state(pair.decode)["disaggregation"]["offload"]["fallbacks"] == fallbacks
    assert_clean(pair)


def test_decode_killed_mid_decode_then_restarted_serves_within_seconds(pair, engine):
    """kill -9 of the decode instance mid-stream: the executor frees the dead instance's rooms at
    once (its channel's peer died), the prefill holds nothing; restarted on the same port, the
    router (``ROUTER_RESILIENCE``) serves through it again within seconds, not the minute its
    default health checks would take."""
    wait_serving(pair.router, pair.url)
    ids = list(range(600, 630))
    want = engine.generate(input_ids=ids, sampling_params=SP)["output_ids"]
    killed = []

    def kill_at_second_chunk(n: int) -> None:
        if n == 2:
            killed.extend(pair.decode.tree())
            for p in killed:
                p.kill()

    try:
        chunks, _ = stream_generate(pair.url, {"input_ids": ids, "sampling_params": SP}, kill_at_second_chunk)
    except requests.RequestException:
        chunks = []  # the body was cut: the instance that could say why is gone
    assert killed and len(chunks) < SP["max_new_tokens"]
    st = wait_until(lambda: executor_state(pair), lambda st: st["used_pages"] == 0, 30)
    assert st["used_pages"] == 0 and st["requests"] == 0
    pair.restart("decode")
    assert_first_request_served_offloaded(pair, ids, want)


class Cut(Exception):
    """Raised from a stream's chunk callback: leaving the stream closes the client's connection."""


@pytest.mark.parametrize("target", ["executor", "decode"])
def test_killed_while_an_offloaded_stream_is_aborted(pair, engine, target):
    """The client drops an offloaded stream after its second chunk and, while that abort travels
    (router, decode front end, scheduler, frees to the executor), the executor or the whole decode
    instance is killed -9. Without its executor a request is served at once by local recompute;
    after the respawn or the restart the first request is served, offloaded, within seconds, and
    KV, rooms and executor pages are back to 0 (no abort left half done on either side)."""
    wait_serving(pair.router, pair.url)
    ids = list(range(700, 730))
    want = engine.generate(input_ids=ids, sampling_params=SP)["output_ids"]
    restarts = executor_state(pair)["restarts"]
    victims = pids(pair, target)
    assert victims

    def cut(n: int) -> None:
        if n == 2:
            raise Cut

    with pytest.raises(Cut):
        stream_generate(pair.url, {"input_ids": ids, "sampling_params": SP}, cut)
    for p in victims:
        p.kill()
    if target == "executor":  # its death is seen at once: served by local recompute, no timeout
        tic = time.monotonic()
        r = generate(pair.url, input_ids=ids, sampling_params=SP)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == want and time.monotonic() - tic < OFFLOAD_TIMEOUT_S / 2
        st = wait_until(
            lambda: executor_state(pair), lambda st: st["restarts"] > restarts and not st["down"], 120
        )
        assert st["restarts"] == restarts + 1 and not st["down"]
    else:
        pair.restart("decode")
    assert_first_request_served_offloaded(pair, ids, want)


def test_restarted_prefill_serves_the_first_requests(pair, engine):
    ids = list(range(400, 420))
    want = engine.generate(input_ids=ids, sampling_params=SP)["output_ids"]
    pair.restart("prefill")
    tic = time.monotonic()
    wait_serving(pair.router, pair.url, timeout_s=PD_TIMEOUT_S * 2 / 3)  # a stall would take 60 s
    r = generate(pair.url, input_ids=ids, sampling_params=SP)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == want and time.monotonic() - tic < PD_TIMEOUT_S
    assert_clean(pair)
