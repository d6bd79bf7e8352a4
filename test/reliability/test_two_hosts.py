"""PD + attention offloading across two hosts: two network namespaces joined by a bridge.

The prefill instance (with its attention executor) lives in one namespace, the decode instance
in another, each with its own address on a private test subnet; SGLang's router runs in the
root namespace. Nothing can fall back to loopback, so this proves that ``--pd-advertise-host``
and the multi-node recipe of docs/pd.md work: KV pages, the executor's per-layer exchange and
the bootstrap all cross a real (virtual) link. Outputs must equal the offline Engine token for
token, and every page is freed afterwards.

Needs root and ``ip netns`` (iproute2); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang_router")

from server_utils import Server, free_port, generate, internal_state, wait_kv_free, wait_until  # noqa: E402

from adrenaline.launch_pd import Cluster, router_command, wait_serving  # noqa: E402

TIMEOUT_S = 30


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetHosts:
    """A bridge in the root namespace and one namespace per host, named after our pid so that
    concurrent runs do not collide; ``close`` deletes all of it."""

    def __init__(self, hosts: list[str]) -> None:
        tag = os.getpid() % 100000
        self.subnet = f"10.213.{tag % 250}"
        self.bridge = f"adrbr{tag}"
        self.ns = {h: f"adr{h}{tag}" for h in hosts}
        self.addr = {h: f"{self.subnet}.{i + 2}" for i, h in enumerate(hosts)}
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, (h, ns) in enumerate(self.ns.items()):
                outer, inner = f"adrv{tag}h{i}", f"adrv{tag}n{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr[h]}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except (subprocess.CalledProcessError, OSError):
            self.close()
            raise

    def close(self) -> None:
        for ns in self.ns.values():  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _make_hosts() -> NetHosts:
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed: cannot make test hosts")
    try:
        return NetHosts(["prefill", "decode"])
    except (subprocess.CalledProcessError, OSError) as e:
        why = getattr(e, "stderr", None) or e
        pytest.skip(f"cannot create network namespaces here (needs root and netns support): {why}")


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    hosts = _make_hosts()
    tmp = tmp_path_factory.mktemp("two_hosts")
    (tmp / "p").mkdir()
    (tmp / "d").mkdir()
    bootstrap = free_port()
    common = ("--pd-timeout", str(TIMEOUT_S))
    prefill = Server(
        tmp / "p", "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap),
        "--enable-attention-offload", "--pd-advertise-host", hosts.addr["prefill"], *common,
        threads=1, host=hosts.addr["prefill"], netns=hosts.ns["prefill"],
    )  # fmt: skip
    decode = Server(
        tmp / "d", "--disaggregation-mode", "decode", "--attention-offload-ratio", "1",
        "--pd-advertise-host", hosts.addr["decode"], "--offload-timeout", "5", *common,
        threads=1, host=hosts.addr["decode"], netns=hosts.ns["decode"],
    )  # fmt: skip
    router = Cluster(str(tmp))
    try:
        prefill.wait_ready()
        decode.wait_ready()
        port = free_port()
        router.start("router", router_command("127.0.0.1", port, [(prefill.url, bootstrap)], [decode.url]))
        url = f"http://127.0.0.1:{port}"
        wait_serving(router, url)
        yield hosts, prefill, decode, url
    finally:
        router.stop()
        decode.stop()
        prefill.stop()
        hosts.close()


def test_pd_and_offload_across_two_hosts(two_hosts, engine):
    from conftest import random_prompts

    hosts, prefill, decode, url = two_hosts
    ids = random_prompts(4, 49152, [9, 40, 23, 61], seed=5)
    sp = [{"temperature": 0, "max_new_tokens": 8, "ignore_eos": True} for _ in ids]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: generate(url, input_ids=ids[i], sampling_params=sp[i]), range(4)))
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs if r.status_code != 200]
    want = engine.generate(input_ids=ids, sampling_params=sp)
    assert [r.json()["output_ids"] for r in outs] == [w["output_ids"] for w in want]
    offloaded = [r.json()["meta_info"]["attention_offloaded"] == [True] for r in outs]
    assert 0 < sum(offloaded) < len(outs)  # ratio 1: both paths crossed the link

    disagg = internal_state(decode)["disaggregation"]
    assert disagg["kv_bytes"] > 0  # the local requests' KV pages came over the link
    text = str(disagg)
    assert hosts.addr["prefill"] in text and "127.0.0.1" not in text  # peers dialled by address

    assert wait_kv_free(decode)["kv_cache"]["num_used_pages"] == 0
    st = wait_until(lambda: internal_state(prefill), lambda s: s["kv_cache"]["num_used_pages"] == 0)
    assert st["kv_cache"]["num_used_pages"] == 0
    ex = wait_until(
        lambda: internal_state(prefill)["disaggregation"]["executor"], lambda e: e["used_pages"] == 0
    )
    assert ex["used_pages"] == 0 and ex["requests"] == 0
