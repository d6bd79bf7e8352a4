"""Streamed logprobs and ``logprob_start_len`` as SGLang 0.5.23 gives them.

The scheduler sends each token's logprobs once, in the step that made the token, and SGLang's
TokenizerManager accumulates them (see docs/errors.md). So each streamed chunk's
``meta_info.output_token_logprobs`` holds one entry per token so far, in step with
``output_ids``, and ``output_token_logprobs_length`` counts them, as with SGLang's own scheduler
(with ``--incremental-streaming-output`` the TokenizerManager slices out the new entries). A
scheduler that resent old entries, or sent them out of step with the tokens, shows up here as
duplicates or misaligned ids.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import requests
from server_utils import generate

PROMPT = "The capital of France is"
SP = {"temperature": 0, "max_new_tokens": 8}


def _entries(meta: dict) -> list[tuple[float, int]]:
    return [(v, i) for v, i, *_ in meta["output_token_logprobs"]]


def _same_logprobs(got: list[tuple[float, int]], want: list[tuple[float, int]]) -> None:
    assert [i for _, i in got] == [i for _, i in want]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], abs=1e-4)


def test_streamed_chunks_hold_each_token_once(server):
    body = {"text": PROMPT, "sampling_params": SP, "return_logprob": True, "top_logprobs_num": 2}
    full = generate(server, **body).json()
    with requests.post(
        server.url + "/generate", json={**body, "stream": True}, stream=True, timeout=120
    ) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith(b"data: {")]
    assert len(chunks) >= 2
    for c in chunks:
        m = c["meta_info"]
        assert [i for _, i in _entries(m)] == c["output_ids"]
        assert len(m["output_top_logprobs"]) == m["output_token_logprobs_length"] == len(c["output_ids"])
    _same_logprobs(_entries(chunks[-1]["meta_info"]), _entries(full["meta_info"]))


def test_dsl_stream_with_logprobs(server):
    import sglang as sgl

    @sgl.function
    def complete(s):
        s += PROMPT
        s += sgl.gen("answer", max_tokens=SP["max_new_tokens"], temperature=0, return_logprob=True)

    state = complete.run(backend=sgl.RuntimeEndpoint(server.url), stream=True)

    async def collect():
        return [x async for x in state.text_async_iter("answer", return_meta_data=True)]

    chunks = [(t, m) for t, m in asyncio.run(collect()) if t]
    full = generate(server, text=PROMPT, sampling_params=SP, return_logprob=True).json()
    assert len(chunks) >= 2 and "".join(t for t, _ in chunks) == full["text"]
    seen = [_entries(m) for _, m in chunks]
    assert all(len(a) < len(b) and b[: len(a)] == a for a, b in zip(seen, seen[1:]))  # grows, no repeats
    _same_logprobs(seen[-1], _entries(full["meta_info"]))
    assert chunks[-1][1]["output_token_logprobs_length"] == len(full["output_ids"])


@pytest.mark.parametrize("start,expected", [(-1, 0), (0, None), (3, None)])
def test_logprob_start_len(server, start, expected):
    """-1 (the default) returns no prompt logprobs, as SGLang 0.5.23's scheduler (it sets the start
    to the prompt length); a position p returns the prompt's entries from p on."""
    r = generate(server, text=PROMPT, sampling_params=SP, return_logprob=True, logprob_start_len=start).json()
    m = r["meta_info"]
    n = m["prompt_tokens"] - start if expected is None else expected
    assert len(m["input_token_logprobs"]) == n
    assert len(m["output_token_logprobs"]) == len(r["output_ids"])
