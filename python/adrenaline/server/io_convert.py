"""SGLang io_struct <-> ``Req``: tokenized requests in, one ``BatchTokenIDOutput`` per step out.

The wire format is SGLang 0.5.23's (see SGLANG_FRONTEND_CONTRACT.md); test_sglang_contract.py pins
it so an sglang upgrade that changes it fails loudly instead of hanging clients.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from sglang.srt.managers.io_struct import BatchTokenIDOutput, TokenizedGenerateReqInput, wrap_as_pickle

from adrenaline.core.request import Bootstrap, Req, finish_abort
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.server.validate import client_message

# SGLang's INIT_INCREMENTAL_DETOKENIZATION_OFFSET: prompt ids the detokenizer gets as left context.
DETOKENIZE_CONTEXT = 5
# SGLang's TOP_K_ALL: top_k meaning "whole vocabulary" after its normalisation.
SGLANG_TOP_K_ALL = 1 << 30

# Request fields this scheduler cannot honour; a request that sets one gets HTTP 400, not a
# silently different answer.
UNSUPPORTED_REQUEST_FIELDS = (
    "input_embeds",
    "mm_inputs",
    "token_ids_logprob",
    "return_hidden_states",
    "return_routed_experts",
    "return_indexer_topk",
    "return_sampling_mask",
    "return_flat_raw_top_logprobs",
    "session_params",
    "lora_id",
    "custom_logit_processor",
    "positional_embed_overrides",
)
UNSUPPORTED_SAMPLING_FIELDS = ("logit_bias", "stop_regex_strs", "structural_tag", "watermark")


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return list(x)


def sampling_params_from_sglang(sp: Any, prompt_len: int, context_len: int) -> SamplingParams:
    """SGLang's normalised ``SamplingParams`` -> ours (greedy arrives as top_k=1)."""
    for name in UNSUPPORTED_SAMPLING_FIELDS:
        if getattr(sp, name, None):
            raise ValueError(f"sampling parameter {name!r} is not supported by this server")
    if sp.beam_width is not None and sp.beam_width > 1:
        raise ValueError("beam search (beam_width > 1) is not supported by this server")
    max_new = sp.max_new_tokens if sp.max_new_tokens is not None else max(context_len - prompt_len, 0)
    params = SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=sp.min_new_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=-1 if sp.top_k >= SGLANG_TOP_K_ALL else sp.top_k,
        min_p=sp.min_p,
        frequency_penalty=sp.frequency_penalty,
        presence_penalty=sp.presence_penalty,
        repetition_penalty=sp.repetition_penalty,
        stop=_as_list(sp.stop_strs),
        stop_token_ids=sorted(sp.stop_token_ids or ()),
        ignore_eos=sp.ignore_eos,
        skip_special_tokens=sp.skip_special_tokens,
        spaces_between_special_tokens=sp.spaces_between_special_tokens,
        no_stop_trim=sp.no_stop_trim,
        regex=sp.regex,
        json_schema=sp.json_schema,
        ebnf=sp.ebnf,
        sampling_seed=sp.sampling_seed,
    )
    params.verify()
    return params


def req_from_tokenized(msg: TokenizedGenerateReqInput, context_len: int) -> Req:
    """Build a ``Req``; ValueError (a client error) for what this server cannot serve."""
    for name in UNSUPPORTED_REQUEST_FIELDS:
        if getattr(msg, name, None):
            raise ValueError(f"{name} is not supported by this server")
    ids = list(msg.input_ids) if msg.input_ids is not None else []
    params = sampling_params_from_sglang(msg.sampling_params, len(ids), context_len)
    return Req(
        rid=msg.rid,
        input_ids=ids,
        params=params,
        return_logprob=bool(msg.return_logprob),
        logprob_start_len=msg.logprob_start_len if msg.return_logprob else -1,
        top_logprobs_num=msg.top_logprobs_num or 0,
        stream=bool(msg.stream),
        bootstrap=Bootstrap(msg.bootstrap_host, msg.bootstrap_port, msg.bootstrap_room),
        extra={"http_worker_ipc": msg.http_worker_ipc},
    )


def rejected_req(msg: Any, message: str, status_code: int = 400) -> Req:
    """A request that finished before it started: the client gets ``status_code`` and ``message``."""
    req = Req(rid=msg.rid, input_ids=[], params=SamplingParams(), stream=bool(getattr(msg, "stream", False)))
    req.extra["http_worker_ipc"] = getattr(msg, "http_worker_ipc", None)
    req.finished_reason = finish_abort(message, status_code)
    return req


def public_reason(reason: dict[str, Any] | None) -> dict[str, Any] | None:
    """A finish reason as the client gets it: abort messages without server paths."""
    if reason is None:
        return None
    reason = dict(reason)
    if isinstance(reason.get("message"), str):
        reason["message"] = client_message(reason["message"])
    return reason


@dataclass
class _Sent:
    """How much of one request the front end already has."""

    ids: int = 0
    output_logprobs: int = 0
    input_logprobs: int = 0
    started: bool = False


def _top(rows: list) -> tuple[list, list]:
    vals = [[v for v, _ in r] if r else [] for r in rows]
    idx = [[i for _, i in r] if r else [] for r in rows]
    return vals, idx


class OutputBatch:
    """Collects the requests that progressed in one step; ``build`` makes the step's message.

    Streaming requests are sent at every new token, others only when they finish (like SGLang),
    so the detokenizer and TokenizerManager do no work for tokens nobody reads yet.
    """

    def __init__(self) -> None:
        self.reqs: list[Req] = []
        self._seen: set[int] = set()

    def add(self, req: Req) -> None:
        if (req.finished or req.stream) and id(req) not in self._seen:
            self._seen.add(id(req))
            self.reqs.append(req)

    def __len__(self) -> int:
        return len(self.reqs)

    def build(self) -> BatchTokenIDOutput:
        reqs = self.reqs
        with_logprobs = any(r.return_logprob for r in reqs)
        cols: dict[str, list] = {
            k: []
            for k in (
                "decode_ids",
                "read_offsets",
                "output_ids",
                "in_val",
                "in_idx",
                "in_top_val",
                "in_top_idx",
                "out_val",
                "out_idx",
                "out_top_val",
                "out_top_idx",
            )
        }
        for req in reqs:
            sent = req.extra.setdefault("_sent", _Sent())
            new_ids = req.output_ids[sent.ids :]
            if sent.started:
                cols["decode_ids"].append(array("q", new_ids))
                cols["read_offsets"].append(0)
            else:
                context = req.input_ids[-DETOKENIZE_CONTEXT:]
                cols["decode_ids"].append(array("q", context + new_ids))
                cols["read_offsets"].append(len(context))
                sent.started = True
            cols["output_ids"].append(array("q", new_ids))
            if with_logprobs:
                self._logprobs(req, sent, cols)
            sent.ids = len(req.output_ids)
            sent.output_logprobs = len(req.output_logprobs)
            sent.input_logprobs = len(req.input_logprobs)
        lp = (lambda k: cols[k]) if with_logprobs else (lambda k: None)
        return BatchTokenIDOutput(
            rids=[r.rid for r in reqs],
            http_worker_ipcs=[r.extra.get("http_worker_ipc") for r in reqs],
            finished_reasons=[public_reason(r.finished_reason) for r in reqs],
            decoded_texts=["" for _ in reqs],
            decode_ids=cols["decode_ids"],
            read_offsets=cols["read_offsets"],
            output_ids=cols["output_ids"],
            skip_special_tokens=[r.params.skip_special_tokens for r in reqs],
            spaces_between_special_tokens=[r.params.spaces_between_special_tokens for r in reqs],
            no_stop_trim=[r.params.no_stop_trim for r in reqs],
            prompt_tokens=[len(r.input_ids) for r in reqs],
            reasoning_tokens=[0 for _ in reqs],
            completion_tokens=[len(r.output_ids) for r in reqs],
            cached_tokens=[r.cached_tokens for r in reqs],
            input_token_logprobs_val=lp("in_val"),
            input_token_logprobs_idx=lp("in_idx"),
            output_token_logprobs_val=lp("out_val"),
            output_token_logprobs_idx=lp("out_idx"),
            input_top_logprobs_val=lp("in_top_val"),
            input_top_logprobs_idx=lp("in_top_idx"),
            output_top_logprobs_val=lp("out_top_val"),
            output_top_logprobs_idx=lp("out_top_idx"),
            input_token_ids_logprobs_val=None,
            input_token_ids_logprobs_idx=None,
            output_token_ids_logprobs_val=None,
            output_token_ids_logprobs_idx=None,
            output_token_entropy_val=None,
            output_token_sampling_mask=None,
            output_hidden_states=None,
            routed_experts=None,
            indexer_topk=None,
            placeholder_tokens_idx=None,
            placeholder_tokens_val=None,
            retraction_counts=[r.retractions for r in reqs],  # the TokenizerManager indexes it
            # meta_info["attention_offloaded"] = [bool], in the request's last message
            customized_info=wrap_as_pickle(
                {
                    "attention_offloaded": [
                        [bool(r.extra.get("attention_offloaded"))] if r.finished else [] for r in reqs
                    ]
                }
            ),  # fmt: skip
        )

    @staticmethod
    def _logprobs(req: Req, sent: _Sent, cols: dict[str, list]) -> None:
        """Append the logprobs computed since the last message (empty for requests not asking)."""
        if req.return_logprob and req.wants_prompt_logprobs:
            lo, hi = sent.input_logprobs, len(req.input_logprobs)
            start = req.logprob_start_len
            in_val = req.input_logprobs[lo:hi]
            in_idx = req.input_ids[start + lo : start + hi]
            in_top = req.input_top_logprobs[lo:hi]
        else:
            in_val, in_idx, in_top = [], [], []
        if req.return_logprob:
            lo, hi = sent.output_logprobs, len(req.output_logprobs)
            out_val = req.output_logprobs[lo:hi]
            out_idx = req.output_ids[lo:hi]
            out_top = req.output_top_logprobs[lo:hi]
        else:
            out_val, out_idx, out_top = [], [], []
        cols["in_val"].append(in_val)
        cols["in_idx"].append(in_idx)
        cols["out_val"].append(out_val)
        cols["out_idx"].append(out_idx)
        for key, rows in (("in_top", in_top), ("out_top", out_top)):
            vals, idx = _top(rows)
            cols[f"{key}_val"].append(vals)
            cols[f"{key}_idx"].append(idx)
