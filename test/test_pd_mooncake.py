"""``--pd-transport mooncake`` as a user starts it: flags, startup checks, and one PD pair with
attention offloading behind SGLang's router, KV pages and per-layer data over the Mooncake
Transfer Engine on loopback TCP. Outputs must equal the offline ``Engine`` (single instance),
as over ``tcp`` (test_pd.py, test_offload.py); the in-process state-machine tests over Mooncake
(aborts and dead peers in every state) are in test_pd_state.py."""

from __future__ import annotations

import http.client
import json
import os
import sys
import time

import pytest

pytest.importorskip("sglang_router")

from server_utils import Server, free_port, generate_all, internal_state, wait_kv_free  # noqa: E402

from adrenaline.launch_pd import Cluster, router_command, wait_serving  # noqa: E402
from adrenaline.launch_server import parse_server_args  # noqa: E402
from adrenaline.server.args import AdrenalineArgs  # noqa: E402
from adrenaline.server.data_plane import data_plane  # noqa: E402
from adrenaline.transport.base import TransportError  # noqa: E402
from adrenaline.transport.mooncake_engine import mooncake_missing  # noqa: E402

MISSING = mooncake_missing()
needs_mooncake = pytest.mark.skipif(MISSING is not None, reason=f"Mooncake not installed: {MISSING}")
TIMEOUT_S = 20
LENGTHS = [4, 40, 70, 9, 150, 33]
KV_BYTES_PER_PAGE = 30 * 2 * 16 * 3 * 64 * 4  # layers, k+v, page, kv heads, head dim, float32


def test_flag_without_mooncake_says_how_to_install(default_model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mooncake", None)  # import fails as on a machine without it
    with pytest.raises(SystemExit):
        parse_server_args(["--model-path", default_model, "--pd-transport", "mooncake"])
    err = capsys.readouterr().err
    assert 'pip install -e ".[mooncake]"' in err and "libibverbs1" in err


@needs_mooncake
@pytest.mark.skipif(os.path.exists("/sys/class/infiniband"), reason="this machine has RDMA devices")
def test_protocol_not_in_use_fails_startup():
    ours = AdrenalineArgs(pd_transport="mooncake", mooncake_protocol="rdma", mooncake_device="mlx5_0")
    with pytest.raises(TransportError, match="would fall back to TCP"):
        data_plane(ours, "127.0.0.1")


@needs_mooncake
def test_pd_with_offload_over_mooncake_matches_the_engine(tmp_path, engine):
    from conftest import random_prompts

    boot, common = free_port(), ["--pd-transport", "mooncake", "--pd-timeout", str(TIMEOUT_S)]
    for d in ("p", "d"):
        (tmp_path / d).mkdir()
    prefill = Server(
        tmp_path / "p", "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot),
        "--enable-attention-offload", "--chunked-prefill-size", "64", *common, threads=1,
    )  # fmt: skip
    decode = Server(
        tmp_path / "d", "--disaggregation-mode", "decode", "--attention-offload-ratio", "1",
        "--offload-exchange", "mooncake", *common, threads=1,
    )  # fmt: skip
    routers, port = Cluster(str(tmp_path)), free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        prefill.wait_ready()
        decode.wait_ready()
        routers.start("router", router_command("127.0.0.1", port, [(prefill.url, boot)], [decode.url]))
        wait_serving(routers, url)
        ids = random_prompts(6, 49152, LENGTHS, seed=5)
        sp = [{"temperature": 0, "max_new_tokens": 5 + 3 * i, "ignore_eos": True} for i in range(6)]
        before = internal_state(decode)["disaggregation"]
        outs = generate_all(url, ids, sp)
        want = engine.generate(input_ids=ids, sampling_params=sp)
        assert [r["output_ids"] for r in outs] == [w["output_ids"] for w in want]
        offloaded = [r["meta_info"]["attention_offloaded"] == [True] for r in outs]
        after = internal_state(decode)["disaggregation"]
        assert 0 < sum(offloaded) < 6 and after["kv_plane"] == "mooncake"
        assert after["offload"]["exchange"]["mooncake_executors"]  # per-layer data over Mooncake
        assert after["offload"]["fallbacks"] == before["offload"]["fallbacks"]  # every layer answered
        local_pages = sum(-(-len(x) // 16) for x, off in zip(ids, offloaded) if not off)
        assert after["pages"] - before["pages"] == local_pages  # announced by landed notices
        assert after["kv_bytes"] == before["kv_bytes"] == 0  # no KV in control messages
        assert internal_state(prefill)["disaggregation"]["kv_bytes"] == local_pages * KV_BYTES_PER_PAGE

        # a client gone while its long prompt is prefilled: both sides free everything
        body = json.dumps({"input_ids": ids[4] * 4, "sampling_params": {"max_new_tokens": 50}})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
        time.sleep(0.3)
        conn.sock.close()
        for srv in (prefill, decode):
            st = wait_kv_free(srv, timeout=TIMEOUT_S + 10)
            assert st["kv_cache"]["num_used_pages"] == 0 and st["disaggregation"]["in_flight"] == 0, st
        assert internal_state(decode)["disaggregation"]["fenced_rooms"] == 0
    finally:
        routers.stop()
        for srv in (prefill, decode):
            srv.stop()
