"""Hostile bodies against one live server: each gets a 4xx that says what is wrong, names no server
file, and the server goes on serving the same greedy answers with its KV back to zero.

The table covers /generate, /v1/completions and /v1/chat/completions: wrong types, negative or huge
numbers, NaN and Infinity, out-of-vocabulary ids, invalid grammars, huge n / stop lists /
top_logprobs, 200 KB prompts, non-UTF-8 and deeply nested JSON. Requests run one after another.
"""

from __future__ import annotations

import json
import re

import pytest
import requests

pytest.importorskip("sglang.srt.entrypoints.http_server")

from server_utils import Server, generate, wait_kv_free  # noqa: E402

G, C, CH = "/generate", "/v1/completions", "/v1/chat/completions"
VOCAB = 49152
MSGS = [{"role": "user", "content": "Hi"}]
BIG = "hello " * 40000  # 240 KB, ~40k tokens: beyond the context
DEEP = b"[" * 5000 + b"1" + b"]" * 5000
# A server path or a traceback in a message: what a client must never see.
LEAK = re.compile(r"(/[\w.@+-]+){2,}|\.py\b|\.cc\b|site-packages|Traceback|File \"")


def g(*, top: dict | None = None, **sp) -> dict:
    return {"text": "Hello there", "sampling_params": {"max_new_tokens": 4, **sp}, **(top or {})}


def c(**kw) -> dict:
    return {"model": "default", "prompt": "Hello there", "max_tokens": 4, **kw}


def ch(**kw) -> dict:
    return {"model": "default", "messages": MSGS, "max_tokens": 4, **kw}


def raw(prefix: str, value: bytes, suffix: str = "}") -> bytes:
    return prefix.encode() + value + suffix.encode()


LOGPROB = {"return_logprob": True}
# (endpoint, JSON body or raw bytes, a word the message must contain)
BAD = [
    # ---- /generate: wrong types
    (G, {"text": 123}, "text"),
    (G, {"text": ["a", 5]}, "text"),
    (G, {"text": "hi", "sampling_params": "greedy"}, "sampling_params"),
    (G, g(max_new_tokens="ten"), "ten"),
    (G, g(top_k=1.5), "1.5"),
    (G, g(stop=5), "StringOrList"),
    (G, g(ignore_eos="maybe"), "boolean"),
    (G, g(sampling_seed="abc"), "abc"),
    (G, g(json_schema={"type": "object"}), "string"),
    (G, g(top={**LOGPROB, "top_logprobs_num": "five"}), "top_logprobs_num"),
    (G, g(top={"return_logprob": "yes"}), "yes"),
    (G, {"text": "hi", "rid": 5}, "rid"),
    (G, {"text": "hi", "stream": "yes"}, "boolean"),
    (G, {"sampling_params": {"max_new_tokens": 2}}, "input_ids"),
    (G, {"text": "hi", "input_ids": [1, 2]}, "not both"),
    # ---- /generate: negative, huge, NaN, Infinity
    (G, g(max_new_tokens=-1), "max_new_tokens"),
    (G, g(max_new_tokens=10**12), "context length"),
    (G, g(max_new_tokens=2**70), "i64"),
    (G, g(temperature=-1), "temperature"),
    (G, raw('{"text": "hi", "sampling_params": {"temperature": ', b"NaN"), "JSON"),
    (G, raw('{"text": "hi", "sampling_params": {"temperature": ', b"Infinity"), "JSON"),
    (G, raw('{"text": "hi", "sampling_params": {"top_p": ', b"-Infinity"), "JSON"),
    (G, g(top_p=0), "top_p"),
    (G, g(top_k=0), "top_k"),
    (G, g(top_k=-5), "top_k"),
    (G, g(min_p=2), "min_p"),
    (G, g(frequency_penalty=3), "frequency_penalty"),
    (G, g(presence_penalty=-2.5), "presence_penalty"),
    (G, g(repetition_penalty=0), "repetition_penalty"),
    (G, g(min_new_tokens=10), "min_new_tokens"),
    (G, g(min_new_tokens=-1), "min_new_tokens"),
    (G, g(sampling_seed=2**70), "i64"),
    (G, g(top={**LOGPROB, "top_logprobs_num": 10_000_000}), "top_logprobs_num"),
    (G, g(top={**LOGPROB, "top_logprobs_num": VOCAB + 1}), "top_logprobs_num"),
    (G, g(top={**LOGPROB, "top_logprobs_num": -3}), "top_logprobs_num"),
    (G, g(top={**LOGPROB, "logprob_start_len": -7}), "logprob_start_len"),
    (G, g(top={**LOGPROB, "logprob_start_len": 10**9}), "logprob_start_len"),
    (G, g(n=1000), "max-parallel-samples"),
    (G, g(n=17), "max-parallel-samples"),
    (G, g(n=0), "max-parallel-samples"),
    (G, g(n=-1), "max-parallel-samples"),
    # ---- /generate: token ids
    (G, {"input_ids": [1, 2, 10**6]}, "input_ids"),
    (G, {"input_ids": [1, -2, 3]}, "input_ids"),
    (G, {"input_ids": [VOCAB]}, "input_ids"),
    (G, {"input_ids": [1.5, 2]}, "input_ids"),
    (G, {"input_ids": [[[1]]]}, "input_ids"),
    (G, {"input_ids": []}, "input_ids"),
    (G, {"input_ids": [2**70]}, "input_ids"),
    (G, g(stop_token_ids=[10**9]), "stop_token_ids"),
    (G, g(stop_token_ids=[-1]), "stop_token_ids"),
    # ---- /generate: grammars, stop lists, sizes, encodings, nesting
    (G, g(regex="(["), "regex"),
    (G, g(regex="(" * 5000 + "a" + ")" * 5000), "regex"),
    (G, g(json_schema="{not json"), "json_schema"),
    (G, g(json_schema=json.dumps({"type": "bogus"})), "json_schema"),
    (G, g(ebnf="root ::= ("), "ebnf"),
    (G, g(ebnf='root ::= "a" | undefined_rule'), "ebnf"),
    (G, g(regex="a", ebnf='root ::= "a"'), "one of"),
    (G, g(stop=["x"] * 100_000), "stop"),
    (G, g(logit_bias={"5": 1.0}), "logit_bias"),
    (G, {"text": ""}, "empty"),
    (G, {"text": BIG}, "context length"),
    (G, b'{"text": "\xff\xfe hi"}', "UTF-8"),
    (G, b'{"text": "hi", ', "JSON"),
    (G, raw('{"text": ', DEEP), "text"),
    (G, DEEP, "dictionary"),
    # ---- /v1/completions
    (C, c(prompt={"a": 1}), "prompt"),
    (C, c(prompt=[[[1]]]), "prompt"),
    (C, c(prompt=[]), "empty"),
    (C, c(prompt=[10**9, 5]), "input_ids"),
    (C, c(prompt=[-5, 5]), "input_ids"),
    (C, c(prompt=BIG), "context length"),
    (C, c(max_tokens=-1), "max_tokens"),
    (C, c(max_tokens="x"), "max_tokens"),
    (C, raw('{"model": "default", "prompt": "hi", "temperature": ', b"NaN"), "JSON"),
    (C, c(temperature=-0.5), "temperature"),
    (C, c(top_p=2), "top_p"),
    (C, c(frequency_penalty=5), "frequency_penalty"),
    (C, c(seed="x"), "seed"),
    (C, c(logprobs=1_000_000), "top_logprobs_num"),
    (C, c(logprobs=-1), "top_logprobs_num"),
    (C, c(echo=True, logprobs=1_000_000), "top_logprobs_num"),
    (C, c(n=1000), "max-parallel-samples"),
    (C, c(n=0), "max-parallel-samples"),
    (C, c(stop=["x"] * 100_000), "stop"),
    (C, b'{"model": "default", "prompt": "\xc3\x28"}', "UTF-8"),
    (C, raw('{"model": "default", "prompt": ', DEEP), "prompt"),
    # ---- /v1/chat/completions
    (CH, {"model": "default"}, "messages"),
    (CH, ch(messages="hi"), "messages"),
    (CH, ch(messages=[]), "empty"),
    (CH, ch(messages=[{"role": "wizard", "content": "hi"}]), "role"),
    (CH, ch(messages=[{"role": "user", "content": 123}]), "content"),
    (CH, raw('{"model": "default", "messages": [{"role": "user", "content": ', DEEP, "}]}"), "messages"),
    (CH, ch(messages=[{"role": "user", "content": BIG}]), "context length"),
    (CH, ch(logprobs=True, top_logprobs=1_000_000), "top_logprobs_num"),
    (CH, ch(logprobs=True, top_logprobs=-1), "top_logprobs_num"),
    (CH, ch(n=1000), "max-parallel-samples"),
    (CH, ch(max_tokens=-1), "max_new_tokens"),
    (CH, ch(max_completion_tokens="x"), "max_completion_tokens"),
    (CH, raw('{"model": "default", "messages": [], "temperature": ', b"Infinity"), "JSON"),
    (CH, ch(min_p=-1), "min_p"),
    (CH, ch(response_format={"type": "bogus"}), "response_format"),
    (CH, ch(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}),
     "json_schema"),
    (CH, ch(regex="(["), "regex"),
    (CH, ch(ebnf="root ::= ("), "ebnf"),
    (CH, ch(tools="not a list"), "tools"),
    (CH, ch(tool_choice="sometimes"), "tool_choice"),
    (CH, ch(stop=["x"] * 100_000), "stop"),
    (CH, ch(stop_token_ids=[10**9]), "stop_token_ids"),
    (CH, b'{"model": "default", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "UTF-8"),
]  # fmt: skip
PROBE = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}


def error_message(r: requests.Response) -> str:
    """The message of an error body in any of the front end's shapes."""
    body = r.json()
    err = body.get("error", body.get("detail", body.get("message")))
    if isinstance(err, dict):
        err = err.get("message")
    assert isinstance(err, str) and err.strip(), r.text
    return err


def post(server: Server, path: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return requests.post(server.url + path, data=data, headers=headers, timeout=120)


def test_bad_bodies_get_4xx_with_a_message_and_the_server_still_serves(server):
    before = generate(server, **PROBE).json()
    assert before["output_ids"] and before["meta_info"]["finish_reason"]["type"] == "length"
    problems = []
    for i, (path, body, needle) in enumerate(BAD):
        r = post(server, path, body)
        text = error_message(r) if r.headers.get("content-type", "").endswith("json") else r.text
        if not 400 <= r.status_code < 500 or needle.lower() not in text.lower() or LEAK.search(text):
            problems.append(f"#{i} {path} {str(body)[:80]!r}: {r.status_code} {text[:300]!r}")
    assert not problems, "\n".join(problems)
    assert len(BAD) >= 60
    after = generate(server, **PROBE).json()
    assert after["output_ids"] == before["output_ids"] and after["text"] == before["text"]
    st = wait_kv_free(server)
    assert st["kv_cache"]["num_used_pages"] == 0 and st["num_running_reqs"] == 0


def test_a_bad_stream_request_ends_with_an_error_event(server):
    body = {**g(), **LOGPROB, "top_logprobs_num": 10_000_000, "stream": True}
    with requests.post(server.url + G, json=body, stream=True, timeout=60) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith(b"data: {")]
    reason = events[-1]["meta_info"]["finish_reason"] if "meta_info" in events[-1] else events[-1]["error"]
    assert reason.get("status_code", reason.get("code")) == 400
    assert "top_logprobs_num" in reason["message"] and not LEAK.search(reason["message"])


def test_bodies_that_look_hostile_but_are_valid_are_served(server):
    """What a user would expect: a stop string that never matches, a large but finite repetition
    count, a deep but valid schema and top_logprobs_num of the whole vocabulary are fine."""
    r = generate(server, **g(stop=["y" * 100_000]))
    assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    r = generate(server, **g(regex="a{1000000}", temperature=0))
    assert r.status_code == 200 and r.json()["text"] == "aaaa"
    schema = {"type": "string"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    r = generate(server, **g(json_schema=json.dumps(schema), temperature=0, max_new_tokens=6))
    assert r.status_code == 200 and re.sub(r"\s", "", r.json()["text"]).startswith('{"a":')
    r = generate(server, **g(max_new_tokens=1, top={**LOGPROB, "top_logprobs_num": VOCAB}))
    assert r.status_code == 200 and len(r.json()["meta_info"]["output_top_logprobs"][0]) == VOCAB
