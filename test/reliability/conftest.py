"""One server (the default model, fp32) shared by the reliability modules that need a live one."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    pytest.importorskip("sglang.srt.entrypoints.http_server")
    from server_utils import Server

    with Server(tmp_path_factory.mktemp("reliability")) as srv:
        yield srv
