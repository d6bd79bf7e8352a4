"""The server end to end: SGLang's HTTP front end on the Adrenaline scheduler, default model, CPU.

One server (float32, so greedy output must equal the offline ``Engine`` token for token) is
started once for the module and SIGTERMed by the last test, which checks that nothing is left
behind: no processes, no /dev/shm files.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

pytest.importorskip("sglang.srt.entrypoints.http_server")

from server_utils import Server, generate, internal_state, wait_kv_free  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    "Once upon a time, a small robot",
]
GREEDY = {"temperature": 0, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# ---- generation -----------------------------------------------------------------------------------
def test_generate_batch_greedy_matches_offline_engine(server, engine):
    r = generate(server, text=PROMPTS, sampling_params=GREEDY)
    assert r.status_code == 200, r.text
    expected = engine.generate(PROMPTS, GREEDY)
    for got, want in zip(r.json(), expected):
        assert got["output_ids"] == want["output_ids"]
        assert got["text"] == want["text"]
        assert got["meta_info"]["prompt_tokens"] == want["meta_info"]["prompt_tokens"]
        assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]


def test_generate_input_ids_and_sampling(server, engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    r = generate(server, input_ids=ids, sampling_params=GREEDY)  # a BatchTokenizedGenerateReqInput
    want = engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert [o["output_ids"] for o in r.json()] == [o["output_ids"] for o in want]
    seeded = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 8, "sampling_seed": 7}
    a, b = (generate(server, text=PROMPTS[1], sampling_params=seeded).json() for _ in range(2))
    assert a["output_ids"] == b["output_ids"] and len(a["output_ids"]) == 8


def test_stream_matches_non_stream(server):
    body = {"text": PROMPTS[0], "sampling_params": GREEDY}
    full = generate(server, **body).json()
    chunks = []
    with requests.post(
        server.url + "/generate", json={**body, "stream": True}, stream=True, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line and line != b"data: [DONE]":
                chunks.append(json.loads(line.removeprefix(b"data: ")))
    assert len(chunks) >= 2
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_logprobs_match_offline_engine(server, engine):
    sp = {"temperature": 0, "max_new_tokens": 5}
    r = generate(server, text=PROMPTS[2], sampling_params=sp, return_logprob=True, logprob_start_len=0,
                 top_logprobs_num=3).json()  # fmt: skip
    want = engine.generate(PROMPTS[2], sp, return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    m, w = r["meta_info"], want["meta_info"]
    assert [t[1] for t in m["output_token_logprobs"]] == r["output_ids"]
    assert [t[0] for t in m["output_token_logprobs"]] == pytest.approx(
        [t[0] for t in w["output_token_logprobs"]], abs=1e-4
    )
    assert len(m["input_token_logprobs"]) == m["prompt_tokens"]
    assert m["input_token_logprobs"][0][0] is None
    assert [t[1] for t in m["input_token_logprobs"]] == [t[1] for t in w["input_token_logprobs"]]
    assert [t[0] for t in m["input_token_logprobs"][1:]] == pytest.approx(
        [t[0] for t in w["input_token_logprobs"][1:]], abs=1e-4
    )
    assert all(len(top) == 3 for top in m["output_top_logprobs"])
    assert m["output_top_logprobs"][0][0][1] == r["output_ids"][0]  # greedy: the top-1 token


def test_max_new_tokens_zero_returns_prompt_logprobs(server, engine):
    r = generate(server, text=PROMPTS[0], sampling_params={"max_new_tokens": 0}, return_logprob=True,
                 logprob_start_len=0).json()  # fmt: skip
    m = r["meta_info"]
    assert m["finish_reason"] == {"type": "length", "length": 0}
    assert r["output_ids"] == [] and m["completion_tokens"] == 0
    want = engine.generate(PROMPTS[0], {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    got_vals = [t[0] for t in m["input_token_logprobs"]]
    want_vals = [t[0] for t in want["meta_info"]["input_token_logprobs"]]
    assert got_vals[0] is None and got_vals[1:] == pytest.approx(want_vals[1:], abs=1e-4)


def test_stop_strings_and_stop_token_ids(server, engine):
    r = generate(server, text=PROMPTS[0], sampling_params={**GREEDY, "stop": ["."]}).json()
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": "."}
    assert "." not in r["text"] and r["text"].strip()
    full = engine.generate(PROMPTS[0], GREEDY)["output_ids"]
    r = generate(server, text=PROMPTS[0], sampling_params={**GREEDY, "stop_token_ids": [full[2]]}).json()
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": full[2]}
    assert r["output_ids"] == full[:3]


def test_regex_and_json_schema(server):
    sp = {"temperature": 0, "max_new_tokens": 16, "regex": "[0-9]{3}-[0-9]{4}"}
    r = generate(server, text="My phone number is", sampling_params=sp).json()
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", r["text"]), r["text"]
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}  # fmt: skip
    sp = {"temperature": 0, "max_new_tokens": 48, "json_schema": json.dumps(schema)}
    r = generate(server, text="Describe a person as JSON:", sampling_params=sp).json()
    obj = json.loads(r["text"])
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int)


# ---- OpenAI API ---------------------------------------------------------------------------------------
def test_openai_chat_and_completions(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=12)
    text = chat.choices[0].message.content
    assert "Paris" in text and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="default", messages=messages, temperature=0, max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text

    comp = client.completions.create(model="default", prompt=PROMPTS[0], temperature=0, max_tokens=6)
    stream = client.completions.create(
        model="default", prompt=PROMPTS[0], temperature=0, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == comp.choices[0].text
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 6
    assert [m.id for m in client.models.list()]


def test_openai_n_and_response_format(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    many = client.completions.create(
        model="default", prompt=PROMPTS[1], temperature=0.8, max_tokens=8, n=3, seed=7
    )
    assert len(many.choices) == 3 and all(c.text for c in many.choices)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Rome"]},
            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    chat = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        temperature=0,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    content = chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop", content
    obj = json.loads(content)
    assert set(obj) == {"city", "population"} and obj["city"] in ("Paris", "Rome")
    assert isinstance(obj["population"], int)


def test_sglang_dsl_gen_select_stream_fork(server):
    import sglang as sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0))
        s += sgl.user("Is that right? Answer yes or no.")
        s += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))

    @sgl.function
    def two_tips(s, topic):
        s += "Two tips about " + topic + ":\n"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=8, temperature=0, stop="\n")
        s += "|".join(f["tip"] for f in forks)

    backend = sgl.RuntimeEndpoint(server.url)
    state = qa.run(question="What is the capital of France?", backend=backend)
    assert "Paris" in state["answer"]  # the DSL formats roles itself: check content, not tokens
    assert state["verdict"] in ("yes", "no")
    streamed = "".join(qa.run(question="Name a color.", backend=backend, stream=True).text_iter("answer"))
    assert streamed and streamed == qa.run(question="Name a color.", backend=backend)["answer"]
    tips = two_tips.run(topic="sleep", backend=backend).text()
    head = "Two tips about sleep:\n"
    assert tips.startswith(head) and tips[len(head) :].count("|") == 1 and len(tips) > len(head) + 4


# ---- service endpoints -----------------------------------------------------------------------------
def test_health_and_info_endpoints(server):
    for path in ("/health", "/health_generate"):
        assert requests.get(server.url + path, timeout=60).status_code == 200
    info = requests.get(server.url + "/model_info", timeout=30).json()
    assert info["model_path"].endswith("SmolLM2-135M-Instruct") and info["is_generation"]
    st = internal_state(server)
    assert st["engine"] == "adrenaline" and st["dtype"] == "float32"
    assert st["kv_cache"]["max_total_num_tokens"] == 8192
    assert st["stats"]["generated_tokens"] > 0
    loads = requests.get(server.url + "/v1/loads", timeout=30).json()["loads"]
    assert loads and loads[0]["max_total_num_tokens"] == 8192


def test_metrics(server):
    text = requests.get(server.url + "/metrics", timeout=30).text
    assert "sglang:num_running_reqs" in text and "adrenaline:forward_passes" in text


def test_flush_cache(server):
    generate(server, text=PROMPTS[3] * 4, sampling_params=GREEDY)  # leaves cached prefix pages
    r = requests.post(server.url + "/flush_cache", timeout=30)
    assert r.status_code == 200, r.text
    assert internal_state(server)["kv_cache"]["num_cached_pages"] == 0


@pytest.mark.parametrize(
    "method,path,body,status,needle",
    [
        ("post", "/update_weights_from_disk", {"model_path": "/nonexistent"}, 400, "not supported"),
        ("post", "/weights_checker", {"action": "snapshot"}, 400, "not supported"),
        ("post", "/start_profile", {}, 500, None),  # SGLang turns the failure reply into a 500
        ("post", "/open_session", {"capacity_of_str_len": 100}, 400, None),
        ("post", "/set_internal_state", {"server_args": {"pp_max_micro_batch_size": 8}}, 200, "false"),
        ("post", "/set_internal_state", {"server_args": {"max_running_requests": 64}}, 200, "true"),
        ("get", "/get_hicache_l3_cache_layout", None, 200, "not supported"),
        ("post", "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 3}, 200, "["),
        ("post", "/release_memory_occupation", {}, 200, None),
        ("post", "/slow_down", {"forward_sleep_time": None}, 200, None),
        ("post", "/update_weight_version", {"new_version": "v2"}, 200, "v2"),
    ],
)
def test_control_requests_are_answered(server, method, path, body, status, needle):
    """Every control request gets an answer (none hangs); unsupported ones say so."""
    r = requests.request(method, server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle is None or needle in r.text


def test_pause_and_continue_generation(server):
    assert requests.post(server.url + "/pause_generation", json={}, timeout=30).status_code == 200
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault("r", generate(server, text="hi", sampling_params=GREEDY))
    )
    t.start()
    t.join(2)
    assert t.is_alive()  # held while paused
    assert requests.post(server.url + "/continue_generation", json={}, timeout=30).status_code == 200
    t.join(60)
    assert result["r"].status_code == 200 and len(result["r"].json()["output_ids"]) == 10


@pytest.mark.parametrize(
    "body,message",
    [
        ({"input_ids": [5] * 9000}, "context length"),
        ({"sampling_params": {"temperature": -1}}, "temperature"),
        ({"sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"sampling_params": {"regex": "(["}}, "regex"),
        ({"sampling_params": {"json_schema": "{not json"}}, "json_schema"),
        ({"input_ids": [1, 2, 10**6]}, "input_ids"),
    ],
)
def test_bad_inputs_are_client_errors(server, body, message):
    body = {"text": "hi", **body} if "input_ids" not in body else body
    r = generate(server, **body)
    assert 400 <= r.status_code < 500, r.text
    assert message in r.text
    assert generate(server, text="hi", sampling_params={"max_new_tokens": 2}).status_code == 200


# ---- aborts ------------------------------------------------------------------------------------------
LONG = {"max_new_tokens": 2000, "ignore_eos": True}


def test_abort_request_frees_kv(server):
    result = {}
    body = {"text": "Count to a thousand:", "rid": "abort-me", "sampling_params": LONG}
    t = threading.Thread(target=lambda: result.setdefault("r", generate(server, **body)))
    t.start()
    deadline = time.monotonic() + 60
    while internal_state(server)["num_running_reqs"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (
        requests.post(server.url + "/abort_request", json={"rid": "abort-me"}, timeout=30).status_code == 200
    )
    t.join(60)
    meta = result["r"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 2000
    st = wait_kv_free(server)
    assert st["kv_cache"]["num_used_pages"] == 0 and st["num_running_reqs"] == 0


def test_client_disconnect_mid_stream_frees_kv(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"text": "Tell me a long story.", "stream": True, "sampling_params": LONG})
    conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.fp.readline()  # the first chunk arrived: it is running
    assert internal_state(server)["kv_cache"]["num_used_pages"] > 0
    conn.sock.close()
    conn.close()
    st = wait_kv_free(server)
    assert st["kv_cache"]["num_used_pages"] == 0 and st["num_running_reqs"] == 0


# ---- load --------------------------------------------------------------------------------------------
def test_64_concurrent_requests(server, engine):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(8)]
    sp = {"temperature": 0, "max_new_tokens": 8}
    expected = [o["output_ids"] for o in engine.generate(prompts, sp)]
    jobs = [i % 8 for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: generate(server, text=prompts[i], sampling_params=sp), jobs))
    assert all(r.status_code == 200 for r in results)
    assert [r.json()["output_ids"] for r in results] == [expected[i] for i in jobs]
    assert wait_kv_free(server)["kv_cache"]["num_used_pages"] == 0


# ---- shutdown: keep last, it stops the module's server -------------------------------------------
def _shm_files(procs: list[psutil.Process]) -> set[str]:
    """/dev/shm files the server's processes have open or mapped."""
    found = set()
    for p in procs:
        try:
            found.update(f.path for f in p.open_files() if f.path.startswith("/dev/shm/"))
            found.update(m.path for m in p.memory_maps() if m.path.startswith("/dev/shm/"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_retraction_with_tiny_kv_budget(tmp_path, engine):
    """More concurrent requests than the KV pool holds: all complete, identical to the Engine."""
    small = Server(tmp_path, "--max-total-tokens", "320", "--page-size", "16")
    try:
        small.wait_ready()
        prompts = [f"Story {i}: once upon a time in a faraway land," for i in range(8)]
        params = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda p: generate(small, text=p, sampling_params=params).json(), prompts))
        want = engine.generate(prompts, params)
        assert [o["text"] for o in outs] == [w["text"] for w in want]
        assert sum(o["meta_info"]["num_retractions"] for o in outs) > 0
        assert wait_kv_free(small)["kv_cache"]["num_used_pages"] == 0
    finally:
        assert small.stop() == []


def test_sigterm_leaves_no_processes_or_shm_files(server):
    procs = server.tree()
    assert any("sglang::scheduler" in " ".join(p.cmdline()) or p.name() == "sglang::scheduler" for p in procs)
    shm = _shm_files(procs)
    assert any(os.path.basename(f).startswith("sglang_loads_") for f in shm)  # /v1/loads' file
    alive = server.stop()
    assert not alive, f"still alive after SIGTERM: {[p.pid for p in alive]}\n{server.log_tail()}"
    assert [f for f in shm if os.path.exists(f)] == []
