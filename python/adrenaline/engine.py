"""Offline API in the spirit of SGLang's ``Engine``: ``Engine().generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
from dataclasses import fields
from typing import Any

from adrenaline.config import EngineConfig
from adrenaline.core.request import Req, finish_abort
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.models.default_model import resolve_model_path
from adrenaline.runner.model_runner import ModelRunner
from adrenaline.scheduler.scheduler import Scheduler


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown Engine argument(s): {', '.join(unknown)}")
        self.config = EngineConfig(model_path=model_path, **kwargs)
        self.model_path = resolve_model_path(model_path)
        self.tokenizer = None
        if not self.config.skip_tokenizer_init:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer_path or self.model_path)
        self.runner = ModelRunner(self.config, self.model_path)
        self.scheduler = Scheduler(self.runner, self.config, self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | SamplingParams | list[dict | SamplingParams] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Generate for one prompt (returns a dict) or a batch (returns a list), run as one batch."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt and input_ids")
        single = isinstance(prompt, str) or (
            input_ids is not None and input_ids and isinstance(input_ids[0], int)
        )
        if prompt is not None:
            if self.tokenizer is None:
                raise ValueError("this engine was started with skip_tokenizer_init: pass input_ids")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch_ids = [self.tokenizer.encode(p) for p in prompts]
        else:
            batch_ids = [list(input_ids)] if single else [list(x) for x in input_ids]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(batch_ids):
                raise ValueError("sampling_params list must match the number of prompts")
            params = [SamplingParams.from_dict(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_dict(sampling_params)] * len(batch_ids)
        reqs = [
            Req(f"offline-{next(self._ids)}", ids, p, return_logprob, logprob_start_len, top_logprobs_num)
            for ids, p in zip(batch_ids, params)
        ]
        for r in reqs:
            self.scheduler.add_request(r)
        while not all(r.finished for r in reqs):
            self.scheduler.step()
        outs = [self._output(r) for r in reqs]
        return outs[0] if single else outs

    def _output(self, req: Req) -> dict[str, Any]:
        p = req.params
        ids = req.output_ids
        fr = req.finished_reason or {}
        if fr.get("type") == "stop" and isinstance(fr.get("matched"), int) and not p.no_stop_trim:
            ids = ids[:-1]  # SGLang drops the matched stop token from the text
        text = (
            ""
            if self.tokenizer is None
            else self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
        )
        if fr.get("type") == "stop" and isinstance(fr.get("matched"), str) and not p.no_stop_trim:
            text = text[: text.find(fr["matched"])] if fr["matched"] in text else text
        meta: dict[str, Any] = {
            "id": req.rid,
            "finish_reason": req.finished_reason,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = list(zip(req.output_logprobs, req.output_ids))
            meta["output_top_logprobs"] = req.output_top_logprobs
            if req.wants_prompt_logprobs:
                meta["input_token_logprobs"] = list(
                    zip(req.input_logprobs, req.input_ids[req.logprob_start_len :])
                )
                meta["input_top_logprobs"] = req.input_top_logprobs
        return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}

    def shutdown(self) -> None:
        self.scheduler.abort(None, finish_abort("engine shut down", 503))
