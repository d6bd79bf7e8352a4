"""The io_struct contract with SGLang's front end, checked without a server.

Our scheduler process talks to SGLang's TokenizerManager and DetokenizerManager in SGLang's own
internal messages (msgpack of msgspec structs). These tests fail loudly when an sglang upgrade
changes what we send or what we are sent, instead of a server that hangs or drops fields.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import msgspec
import pytest

io = pytest.importorskip("sglang.srt.managers.io_struct")

from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams  # noqa: E402

from adrenaline.core.request import Req, finish_length, finish_stop  # noqa: E402
from adrenaline.core.sampling_params import SamplingParams  # noqa: E402
from adrenaline.offload.exchange import TransportExchange  # noqa: E402
from adrenaline.offload.manager import OffloadManager  # noqa: E402
from adrenaline.offload.policy import StaticRatioPolicy  # noqa: E402
from adrenaline.scheduler.placement import Placement  # noqa: E402
from adrenaline.server import control  # noqa: E402
from adrenaline.server.io_convert import OutputBatch, rejected_req, req_from_tokenized  # noqa: E402


@pytest.fixture(autouse=True)
def msgpack_wire(monkeypatch):
    """Build messages for the msgpack wire (typed, so decoding checks fields), as with
    SGLANG_USE_PICKLE_IPC=0; opaque fields are then wrapped in PickleWrapper."""
    monkeypatch.setattr(io, "_USE_PICKLE_IPC", False)


def roundtrip(obj):
    """Through the wire exactly as the processes send it; decoding checks every field's type."""
    out = io.msgpack_decode(io.msgpack_encode(obj))
    assert type(out) is type(obj)
    return out


@pytest.fixture(scope="module")
def tok(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


def tokenized(rid="r1", ids=(1, 2, 3, 4, 5, 6, 7), stream=False, tok=None, **sampling):
    """A ``TokenizedGenerateReqInput`` built the way TokenizerManager builds one."""
    sp = SGLSamplingParams(**sampling)
    sp.normalize(tok)
    sp.verify(49152)
    return io.TokenizedGenerateReqInput(
        rid=rid,
        http_worker_ipc="ipc://worker",
        input_text=None,
        input_ids=array("q", ids),
        input_embeds=None,
        mm_inputs=None,
        token_type_ids=None,
        sampling_params=sp,
        return_logprob=True,
        logprob_start_len=2,
        top_logprobs_num=2,
        token_ids_logprob=None,
        stream=stream,
        bootstrap_host="2.2.2.2",
        bootstrap_room=7,
    )


def test_tokenized_request_converts(tok):
    msg = roundtrip(
        tokenized(
            tok=tok,
            max_new_tokens=9,
            temperature=0,
            stop=["\n\n"],
            stop_token_ids=[5],
            regex="[a-z]+",
            sampling_seed=3,
        )
    )
    req = req_from_tokenized(msg, context_len=8192)
    assert req.rid == "r1" and req.input_ids == [1, 2, 3, 4, 5, 6, 7]
    assert req.extra["http_worker_ipc"] == "ipc://worker"
    assert req.bootstrap == ("2.2.2.2", None, 7)
    p = req.params
    assert p.greedy and p.top_k == 1  # SGLang turns temperature 0 into top_k 1
    assert (p.max_new_tokens, p.stop, p.stop_token_ids, p.regex, p.sampling_seed) == (
        9,
        ["\n\n"],
        [5],
        "[a-z]+",
        3,
    )
    assert (req.return_logprob, req.logprob_start_len, req.top_logprobs_num) == (True, 2, 2)


def test_sampling_defaults_convert():
    req = req_from_tokenized(roundtrip(tokenized(max_new_tokens=None)), context_len=100)
    p = req.params
    assert p.top_k == -1 and p.temperature == 1.0 and p.top_p == 1.0 and p.stop == []
    assert p.max_new_tokens == 100 - 7  # None: up to the context length


def test_batch_request_roundtrips():
    batch = roundtrip(io.BatchTokenizedGenerateReqInput(batch=[tokenized("a"), tokenized("b")]))
    assert [m.rid for m in batch.batch] == ["a", "b"]


@pytest.mark.parametrize(
    "field,value", [("token_ids_logprob", [1]), ("return_hidden_states", True), ("lora_id", "x")]
)
def test_unsupported_request_field_is_a_client_error(field, value):
    msg = tokenized()
    setattr(msg, field, value)
    with pytest.raises(ValueError, match=field):
        req_from_tokenized(msg, context_len=8192)


def _progressed_req(stream: bool) -> Req:
    req = Req("s1", [10, 11, 12, 13, 14, 15, 16, 17], SamplingParams(), True, 0, 2, stream=stream)
    req.extra["http_worker_ipc"] = "ipc://w"
    req.input_logprobs = [None, -1.0, -2.0, -3.0, -1.5, -0.5, -0.25, -0.125]
    req.input_top_logprobs = [None] + [[(-0.1, 1), (-0.2, 2)]] * 7
    req.output_ids = [20]
    req.output_logprobs = [-0.3]
    req.output_top_logprobs = [[(-0.3, 20), (-1.0, 21)]]
    return req


def test_output_message_fields():
    req = _progressed_req(stream=True)
    batch = OutputBatch()
    batch.add(req)
    out = roundtrip(batch.build())
    assert out.rids == ["s1"] and out.http_worker_ipcs == ["ipc://w"]
    assert out.finished_reasons == [None]
    # First chunk: the last 5 prompt ids as detokenizer context, then the new ids.
    assert list(out.decode_ids[0]) == [13, 14, 15, 16, 17, 20] and out.read_offsets == [5]
    assert list(out.output_ids[0]) == [20] and out.decoded_texts == [""]
    assert out.retraction_counts == [0]  # the TokenizerManager indexes it unconditionally
    assert (out.prompt_tokens, out.completion_tokens, out.cached_tokens) == ([8], [1], [0])
    assert out.input_token_logprobs_val[0][0] is None and out.input_token_logprobs_idx[0][:2] == [10, 11]
    assert out.input_top_logprobs_val[0][0] == [] and out.input_top_logprobs_idx[0][1] == [1, 2]
    assert out.output_token_logprobs_val == [[-0.3]] and out.output_token_logprobs_idx == [[20]]
    assert out.output_top_logprobs_idx == [[[20, 21]]]
    assert io.unwrap_from_pickle(out.customized_info) == {"attention_offloaded": [[]]}
    # Second chunk: only what is new, no prompt context, input logprobs not repeated.
    req.output_ids.append(21)
    req.output_logprobs.append(-0.4)
    req.output_top_logprobs.append(None)
    req.finished_reason = finish_stop(21)
    batch = OutputBatch()
    batch.add(req)
    out = roundtrip(batch.build())
    assert list(out.decode_ids[0]) == [21] and out.read_offsets == [0]
    assert out.finished_reasons == [{"type": "stop", "matched": 21}]
    assert out.input_token_logprobs_val == [[]] and out.output_token_logprobs_val == [[-0.4]]
    assert out.output_top_logprobs_val == [[[]]]
    # meta_info["attention_offloaded"] arrives with the last message
    assert io.unwrap_from_pickle(out.customized_info) == {"attention_offloaded": [[False]]}


def test_non_streaming_requests_are_sent_only_when_finished():
    req = _progressed_req(stream=False)
    batch = OutputBatch()
    batch.add(req)
    assert len(batch) == 0
    req.finished_reason = finish_length(1)
    batch.add(req)
    out = roundtrip(batch.build())
    assert out.finished_reasons == [{"type": "length", "length": 1}]


def test_rejection_is_an_http_400_abort():
    batch = OutputBatch()
    batch.add(rejected_req(tokenized(), "bad regex"))
    out = roundtrip(batch.build())
    assert out.finished_reasons == [{"type": "abort", "message": "bad regex", "status_code": 400}]
    assert out.output_token_logprobs_val is None  # nobody asked: no logprob lists at all


def test_detokenizer_reads_our_chunks(tok):
    """SGLang's own incremental detokenisation turns our chunks into the full text."""
    from sglang.srt.managers.detokenizer_manager import DetokenizerManager, LimitedCapacityDict

    detok = DetokenizerManager.__new__(DetokenizerManager)
    detok.tokenizer, detok.vocab_size = tok, len(tok)
    detok.decode_status = LimitedCapacityDict(capacity=16)
    detok.disable_tokenizer_batch_decode = False
    detok.is_tool_call_parser_gpt_oss, detok.tool_close_token_ids = False, set()

    prompt = tok.encode("The capital of France is")
    answer = tok.encode(" Paris, a city of light.")
    req = Req("d1", prompt, SamplingParams(), stream=True)
    text = ""
    for i, t in enumerate(answer):
        req.output_ids.append(t)
        if i == len(answer) - 1:
            req.finished_reason = finish_length(len(answer))
        batch = OutputBatch()
        batch.add(req)
        text += detok._decode_batch_token_id_output(roundtrip(batch.build()))[0]
    assert text == " Paris, a city of light."


def _dummy(cls):
    """An instance with every required field None (msgspec does not check types on init)."""
    return cls(**{f.name: None for f in msgspec.structs.fields(cls) if f.required})


class _FakeScheduler:
    running, waiting, page_size, has_work = [], [], 16, False
    placement = Placement()

    def requests(self) -> list:
        return []

    class allocator:  # noqa: N801
        @staticmethod
        def flush() -> bool:
            return True

    class config:  # noqa: N801
        max_running_requests, chunked_prefill_size = 8, 64


def _answers(msg, scheduler=None) -> list:
    replies = []
    scheduler = scheduler or _FakeScheduler()
    handler = control.ControlHandler(
        scheduler,
        [scheduler],
        reply=lambda out, req: replies.append(out),
        forward=lambda m: None,
        emit=lambda r: None,
        internal_state=lambda: {"engine": "adrenaline"},
    )
    handler.handle(msg)
    return replies


def test_every_communicator_reply_type_is_answered():
    """Each reply type the TokenizerManager waits on has a request we answer with it."""
    from sglang.srt.managers.tokenizer_control_mixin import _COMMUNICATOR_SPECS

    served = {
        "FlushCacheReqOutput",
        "GetInternalStateReqOutput",
        "SetInternalStateReqOutput",
        "GetWeightsByNameReqOutput",
        "GetHiCacheL3LayoutReqOutput",
        "SlowDownReqOutput",
        "UpdateWeightVersionReqOutput",
    }
    answered = served | {reply for reply, _ in control.UNSUPPORTED.values()}
    waited_on = {spec[1].__name__ for spec in _COMMUNICATOR_SPECS}
    assert waited_on <= answered, f"new control replies to implement: {sorted(waited_on - answered)}"


@pytest.mark.parametrize("name", sorted(control.UNSUPPORTED))
def test_unsupported_requests_get_a_failure_reply(name):
    reply_name, feature = control.UNSUPPORTED[name]
    replies = _answers(_dummy(getattr(io, name)))
    assert len(replies) == 1
    reply = roundtrip(replies[0])
    assert type(reply).__name__ == reply_name
    if hasattr(reply, "success"):
        assert reply.success is False
    text = " ".join(str(getattr(reply, f, "")) for f in ("message", "error_message", "error"))
    if any(hasattr(reply, f) for f in ("message", "error_message", "error")):
        assert feature in text


@pytest.mark.parametrize(
    "msg,reply_type",
    [
        (io.FlushCacheReqInput(), "FlushCacheReqOutput"),
        (io.GetInternalStateReq(), "GetInternalStateReqOutput"),
        (io.SetInternalStateReq(server_args={"max_running_requests": 4}), "SetInternalStateReqOutput"),
        (io.GetHiCacheL3LayoutReq(), "GetHiCacheL3LayoutReqOutput"),
        (io.SlowDownReqInput(forward_sleep_time=None), "SlowDownReqOutput"),
        (io.UpdateWeightVersionReqInput(new_version="v2"), "UpdateWeightVersionReqOutput"),
    ],
)
def test_supported_control_requests_reply(msg, reply_type):
    replies = _answers(msg)
    assert [type(roundtrip(r)).__name__ for r in replies] == [reply_type]


def test_set_internal_state_changes_the_static_offload_ratio_live():
    scheduler = _FakeScheduler()
    scheduler.config = SimpleNamespace(max_running_requests=8, chunked_prefill_size=64)
    policy = StaticRatioPolicy(1.0)
    scheduler.placement = OffloadManager(policy, TransportExchange(None), timeout_s=1)
    updated = lambda args: _answers(io.SetInternalStateReq(server_args=args), scheduler)[0].updated
    assert updated({"attention_offload_ratio": "inf"}) and policy.ratio == float("inf")
    assert updated({"attention_offload_ratio": 0, "max_running_requests": 4}) and policy.ratio == 0
    assert scheduler.config.max_running_requests == 4
    for bad in ({"attention_offload_ratio": -1}, {"attention_offload_ratio": "x"},
                {"attention_offload_ratio": 2, "bogus": 1}):  # fmt: skip
        assert not updated(bad) and policy.ratio == 0
    assert not _answers(io.SetInternalStateReq(server_args={"attention_offload_ratio": 1}))[0].updated


@pytest.mark.parametrize("name", sorted(control.IGNORED))
def test_fire_and_forget_messages_exist(name):
    assert isinstance(getattr(io, name), type)


def test_abort_req_fields():
    msg = roundtrip(io.AbortReq(rid="x", abort_all=False, abort_message=None))
    assert (msg.rid, msg.abort_all, msg.finished_reason) == ("x", False, None)
