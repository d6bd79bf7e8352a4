"""SGLang's ``/health`` on a busy server: answered after the scheduler's next step, not queued as a
request behind the waiting prompts (a router probing a busy prefill instance would time out and
take it out of service: docs/pd.md, router health checks)."""

from __future__ import annotations

import requests
from server_utils import internal_state, stream_generate


def test_health_on_a_busy_server_is_answered_without_running_a_request(server):
    ids = list(range(200, 240))
    n = 64
    before = internal_state(server)["stats"]
    codes = []

    def probe(chunk: int) -> None:
        if chunk in (2, 3):  # mid-decode: the scheduler is busy
            codes.append(requests.get(server.url + "/health", timeout=30).status_code)

    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
    chunks, _ = stream_generate(server.url, body, probe)
    assert codes == [200, 200] and chunks[-1]["meta_info"]["completion_tokens"] == n
    after = internal_state(server)["stats"]
    # only the stream ran: a probe run as a request would add its 1-token prompt and 1 output token
    prompt = sum(after[k] - before[k] for k in ("prompt_tokens_computed", "prompt_tokens_cached"))
    assert prompt == len(ids) and after["generated_tokens"] - before["generated_tokens"] == n
