"""Attention offloading end to end on CPU, through SGLang's router.

One prefill instance with its attention executor serves four decode instances at offload
ratios 0, 0.5 and "all" (inf), each behind its own router; at 0.5 and "all" per-layer data goes
over shared memory (same host: the default, ``auto``), and a second "all" instance uses TCP (the
in-process tests in test_pd_state.py cover both paths at other ratios). Outputs
must equal the offline ``Engine`` (greedy, float32) token for token; offloaded requests move no
KV to the decode side; the executor's KV is free once requests finish or are aborted. The last
test kills the executor mid-decode: the decode instance recomputes locally and keeps serving.
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytest.importorskip("sglang_router")

from server_utils import Server, free_port, generate, internal_state, wait_kv_free, wait_until  # noqa: E402

from adrenaline.launch_pd import Cluster, router_command, wait_serving  # noqa: E402

TIMEOUT_S = 20
RATIOS = {  # name -> (offload ratio, --offload-exchange)
    "none": ("0", "auto"),
    "half": ("0.5", "auto"),
    "all": ("inf", "auto"),
    "all-tcp": ("inf", "tcp"),
}
LENGTHS = [4, 21, 40, 9, 70, 33]
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
        for name, (ratio, exchange) in RATIOS.items():
            (tmp / name).mkdir()
            self.decodes[name] = Server(
                tmp / name, "--disaggregation-mode", "decode", "--attention-offload-ratio", ratio,
                "--offload-exchange", exchange, "--pd-timeout", str(TIMEOUT_S), "--offload-timeout", "3",
                threads=1,
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


@pytest.mark.parametrize("name", list(RATIOS))
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
    elif name.startswith("all"):
        assert all(offloaded)
    else:
        assert 0 < sum(offloaded) < 6
    if name != "none":  # the data path the flag chose: shared memory on this host unless tcp
        exchange = after["offload"]["exchange"]
        assert (exchange["kind"] == "tcp") == name.endswith("-tcp")
        assert bool(exchange.get("shm_executors")) == (not name.endswith("-tcp")), exchange
    # KV crosses only for local requests: the offloaded ones' KV never reaches the decode side
    local_pages = sum(-(-len(x) // 16) for x, off in zip(ids, offloaded) if not off)
    assert after["kv_bytes"] - before["kv_bytes"] == local_pages * KV_BYTES_PER_PAGE
    fallbacks = lambda st: st.get("offload", {}).get("fallbacks", 0)
    assert fallbacks(after) == fallbacks(before)  # the executor answered every layer
    st = wait_executor_free(dep)
    assert st["used_pages"] == 0 and st["requests"] == 0
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
    body = {"input_ids": ids, "sampling_params": sp, "stream": True}
    chunks = []
    with requests.post(dep.urls["all"] + "/generate", json=body, stream=True, timeout=180) as r:
        for line in r.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            chunks.append(json.loads(line.removeprefix(b"data: ")))
            if len(chunks) == 2:  # decoding on the executor: kill it
                victims = [p for p in dep.prefill.tree() if "attention_executor" in " ".join(p.cmdline())]
                assert victims, "no attention executor process found"
                for p in victims:
                    p.kill()
    want = engine.generate(input_ids=ids, sampling_params=sp)["output_ids"]
    assert chunks[-1]["output_ids"] == want
    st = internal_state(dep.decodes["all"])["disaggregation"]
    assert st["offload"]["fallbacks"] >= 1
    # new requests are still served (locally now), identical to the engine
    short = {**sp, "max_new_tokens": 8}
    r = generate(dep.urls["all"], input_ids=ids[:10], sampling_params=short)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == engine.generate(input_ids=ids[:10], sampling_params=short)["output_ids"]
