"""Rendezvous through SGLang's bootstrap server, the one its TokenizerManager starts on a prefill
instance at ``--disaggregation-bootstrap-port``.

SGLang's router hands both instances that port with every request, so the decode side finds the
prefill side's transport address there: the prefill scheduler registers it as a single rank
(``PUT /route``), the decode scheduler reads it back (``GET /route``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

from adrenaline.transport.zmq_transport import reachable_host

logger = logging.getLogger(__name__)

RANK_QUERY = "prefill_dp_rank=0&prefill_cp_rank=0&target_tp_rank=0&target_pp_rank=0"


def _route_url(host: str, port: int) -> str:
    return f"http://{reachable_host(host)}:{port}/route"


def register_prefill(
    host: str, port: int, address: str, page_size: int, kv_dtype: str, http_port: int, timeout_s: float = 300
) -> threading.Thread:
    """Register ``address`` (tcp://ip:port) in the bootstrap server, retrying until it is up."""
    ip, rank_port = address.removeprefix("tcp://").rsplit(":", 1)
    body = {
        "attn_tp_size": 1, "attn_tp_rank": 0, "attn_cp_size": 1, "attn_cp_rank": 0,
        "attn_dp_size": 1, "attn_dp_rank": 0, "pp_size": 1, "pp_rank": 0,
        "system_dp_size": 1, "system_dp_rank": 0,
        "rank_ip": ip, "rank_port": int(rank_port), "page_size": page_size,
        "kv_cache_dtype": kv_dtype, "prefill_http_port": http_port,
    }  # fmt: skip
    data = json.dumps(body).encode()

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            req = urllib.request.Request(_route_url(host, port), data=data, method="PUT")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        logger.info("registered %s in the bootstrap server on port %d", address, port)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        logger.error(
            "could not register in the bootstrap server on port %d: decode peers cannot reach us", port
        )

    thread = threading.Thread(target=run, name="bootstrap-register", daemon=True)
    thread.start()
    return thread


def lookup_prefill(host: str, port: int, timeout_s: float = 3.0) -> str:
    """The transport address a prefill instance registered; OSError when it cannot be had."""
    url = f"{_route_url(host, port)}?{RANK_QUERY}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            info = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise OSError(f"bootstrap server {host}:{port} answered {e.code}: {e.read().decode()[:200]}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise OSError(f"bootstrap server {host}:{port} unreachable: {e}") from e
    return f"tcp://{info['rank_ip']}:{info['rank_port']}"
