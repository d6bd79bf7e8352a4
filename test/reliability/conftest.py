"""One server (the default model, fp32) shared by the reliability modules that need a live one."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    pytest.importorskip("sglang.srt.entrypoints.http_server")
    from server_utils import Server

    srv = Server(tmp_path_factory.mktemp("reliability"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
