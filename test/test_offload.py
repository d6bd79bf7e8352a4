"""Attention offloading end to end on CPU, through SGLang's router.

One prefill instance with its attention executor serves four decode instances, each behind its
own router: static offload ratios 0, 0.5 and "all" (inf), and the load-aware policy priced by a
synthetic profile written here (local attention far dearer than the executor's, so offloading
costs the step nothing) on a decode instance whose small KV pool holds only some of the requests:
it keeps what fits there and offloads the rest, as memory allows. Per-layer data goes over
shared memory (same host: the default, ``auto``), except for the "all" instance, which uses TCP
(the in-process tests in test_pd_state.py cover both paths at other ratios). Outputs must equal
the offline ``Engine`` (greedy, float32) token for token; offloaded requests move no KV to the
decode side; the executor's KV is free once requests finish or are aborted. The last test kills
the executor mid-decode: the decode instance sees it die at once (its TCP connection closes; no
stall near ``--offload-timeout``), recomputes locally and keeps serving.
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang_router")

from server_utils import (  # noqa: E402
    Server,
    assert_no_stall,
    free_port,
    generate,
    internal_state,
    stream_generate,
    wait_kv_free,
    wait_until,
)

from adrenaline.core.profile import Curve, Grid, Profile, save_profile  # noqa: E402
from adrenaline.launch_pd import Cluster, router_command, wait_serving  # noqa: E402

TIMEOUT_S = 20
OFFLOAD_TIMEOUT_S = 30  # far above what noticing a dead executor may take (its connection closes)
RATIOS = {"none": "0", "half": "0.5", "all": "inf"}
POLICIES = [*RATIOS, "load-aware"]
OVER_TCP = {"all"}  # --offload-exchange tcp; the others use the default (shared memory here)
LENGTHS = [4, 21, 40, 9, 70, 33]
LOAD_AWARE_KV = 128  # tokens: the longest request (70 + 22) fits alone, not all six prompts (15 pages)
KV_BYTES_PER_PAGE = 30 * 2 * 16 * 3 * 64 * 4  # layers, k+v, page, kv heads, head dim, float32


class Deployment:
    def __init__(self, tmp) -> None:
        self.bootstrap = free_port()
        (tmp / "p").mkdir()
        self.prefill = Server(
            tmp / "p", "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
            str(self.bootstrap), "--enable-attention-offload", "--pd-timeout", str(TIMEOUT_S), threads=1,
        )  # fmt: skip
        self.decodes, self.urls = {}, {}
        policies = {name: ["--attention-offload-ratio", ratio] for name, ratio in RATIOS.items()}
        save_profile(executor_pays(), tmp / "profile.json")
        profile = str(tmp / "profile.json")
        policies["load-aware"] = ["--attention-offload-policy", "load-aware", "--offload-profile", profile,
                                  "--max-total-tokens", str(LOAD_AWARE_KV)]  # fmt: skip
        for name, policy in policies.items():
            (tmp / name).mkdir()
            exchange = "tcp" if name in OVER_TCP else "auto"
            self.decodes[name] = Server(
                tmp / name, "--disaggregation-mode", "decode", *policy, "--offload-exchange", exchange,
                "--pd-timeout", str(TIMEOUT_S), "--offload-timeout", str(OFFLOAD_TIMEOUT_S), threads=1,
            )  # fmt: skip
        self.routers = Cluster(str(tmp))

    def start(self) -> None:
        for srv in (self.prefill, *self.decodes.values()):
            srv.wait_ready()
        for name, decode in self.decodes.items():
            port = free_port()
            prefills = [(self.prefill.url, self.bootstrap)]
            self.routers.start(f"router-{name}", router_command("127.0.0.1", port, prefills, [decode.url]))
            self.urls[name] = f"http://127.0.0.1:{port}"
        for url in self.urls.values():
            wait_serving(self.routers, url)

    def stop(self) -> None:
        self.routers.stop()
        for srv in (self.prefill, *self.decodes.values()):
            srv.stop()


def executor_pays() -> Profile:
    """Local attention 100 ms a layer, the executor's and the exchange 0.01 ms: offloading pays."""
    flat = lambda ms: Grid([1, 64], [0, 65536], [[ms, ms], [ms, ms]])
    return Profile(
        model="synthetic", dtype="float32", device="cpu", machine="test", num_layers=30,
        executor_threads=1, prefill_threads=1, decode_dense=Curve([1, 64], [1, 2]),
        local_attention=flat(100), executor_attention=flat(0.01), executor_threads_scaling=Curve([1], [1]),
        exchange=Curve([1, 64], [0.01, 0.01]), prefill_interference=Curve([0], [1]),
    )  # fmt: skip


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("offload"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


def executor_state(dep) -> dict:
    return internal_state(dep.prefill)["disaggregation"]["executor"]


def wait_executor_free(dep) -> dict:
    return wait_until(lambda: executor_state(dep), lambda st: st["used_pages"] == 0)


@pytest.mark.parametrize("name", POLICIES)
def test_outputs_identical_at_every_ratio(dep, engine, name):
    from conftest import random_prompts

    ids = random_prompts(6, 49152, LENGTHS, seed=11)
    sp = [{"temperature": 0, "max_new_tokens": 6 + 4 * i, "ignore_eos": True} for i in range(6)]
    decode, url = dep.decodes[name], dep.urls[name]
    before = internal_state(decode)["disaggregation"]
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda i: generate(url, input_ids=ids[i], sampling_params=sp[i]), range(6)))
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs if r.status_code != 200]
    want = engine.generate(input_ids=ids, sampling_params=sp)
    assert [r.json()["output_ids"] for r in outs] == [w["output_ids"] for w in want]
    offloaded = [r.json()["meta_info"]["attention_offloaded"] == [True] for r in outs]
    after = internal_state(decode)["disaggregation"]
    if name == "none":
        assert not any(offloaded)
    elif name == "all":
        assert all(offloaded)
    elif name == "load-aware":  # the first admitted fits the small pool (local), not all the others
        assert 0 < sum(offloaded) < 6
        assert after["offload"]["decisions"]["ok"] >= sum(offloaded)
    else:
        assert 0 < sum(offloaded) < 6
    if name != "none":  # the data path the flag chose: shared memory on this host unless tcp
        exchange = after["offload"]["exchange"]
        assert (exchange["kind"] == "tcp") == (name in OVER_TCP)
        assert bool(exchange.get("shm_executors")) == (name not in OVER_TCP), exchange
    # KV crosses only for local requests: the offloaded ones' KV never reaches the decode side
    local_pages = sum(-(-len(x) // 16) for x, off in zip(ids, offloaded) if not off)
    assert after["kv_bytes"] - before["kv_bytes"] == local_pages * KV_BYTES_PER_PAGE
    fallbacks = lambda st: st.get("offload", {}).get("fallbacks", 0)
    assert fallbacks(after) == fallbacks(before)  # the executor answered every layer
    st = wait_executor_free(dep)
    assert st["used_pages"] == 0 and st["requests"] == 0 and st["committed"] == {}  # the ledger too
    assert wait_kv_free(decode)["kv_cache"]["num_used_pages"] == 0


def test_abort_frees_executor_kv(dep):
    body = json.dumps({"input_ids": list(range(100, 160)), "stream": True,
                       "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}})  # fmt: skip
    port = int(dep.urls["all"].rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.fp.readline()  # decoding, its attention on the executor
    assert executor_state(dep)["used_pages"] > 0
    conn.sock.close()
    conn.close()
    st = wait_executor_free(dep)
    assert st["used_pages"] == 0 and st["requests"] == 0
    assert wait_kv_free(dep.decodes["all"])["kv_cache"]["num_used_pages"] == 0


def test_executor_killed_mid_decode_recomputes_locally(dep, engine):
    ids = list(range(200, 230))
    sp = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}

    def kill_at_second_chunk(n: int) -> None:  # decoding on the executor: kill it
        if n == 2:
            victims = [p for p in dep.prefill.tree() if "attention_executor" in " ".join(p.cmdline())]
            assert victims, "no attention executor process found"
            for p in victims:
                p.kill()

    chunks, times = stream_generate(
        dep.urls["all"], {"input_ids": ids, "sampling_params": sp}, kill_at_second_chunk
    )
    want = engine.generate(input_ids=ids, sampling_params=sp)["output_ids"]
    assert chunks[-1]["output_ids"] == want
    assert_no_stall(times[1:], OFFLOAD_TIMEOUT_S)  # its closed connection is seen, not its silence
    st = internal_state(dep.decodes["all"])["disaggregation"]
    assert st["offload"]["fallbacks"] >= 1
    # new requests are still served (locally now), identical to the engine
    short = {**sp, "max_new_tokens": 8}
    r = generate(dep.urls["all"], input_ids=ids[:10], sampling_params=short)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == engine.generate(input_ids=ids[:10], sampling_params=short)["output_ids"]
