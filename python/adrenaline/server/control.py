"""Control requests from SGLang's TokenizerManager: answer every one, never stay silent.

The TokenizerManager awaits most control replies without a timeout, so an ignored request hangs
its endpoint and everything queued behind it. Supported requests are served; the rest get their
reply type with ``success=False`` and a message saying what is not supported.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from sglang.srt.managers import io_struct as io

from adrenaline.core.request import Req

logger = logging.getLogger(__name__)

# Requests this scheduler does not support -> (reply type, feature named in the message).
UNSUPPORTED: dict[str, tuple[str, str]] = {
    "ClearHiCacheReqInput": ("ClearHiCacheReqOutput", "hierarchical cache"),
    "AttachHiCacheStorageReqInput": ("AttachHiCacheStorageReqOutput", "hierarchical cache"),
    "DetachHiCacheStorageReqInput": ("DetachHiCacheStorageReqOutput", "hierarchical cache"),
    "UpdateWeightFromDiskReqInput": ("UpdateWeightFromDiskReqOutput", "weight updates"),
    "InitWeightsUpdateGroupReqInput": ("InitWeightsUpdateGroupReqOutput", "weight updates"),
    "DestroyWeightsUpdateGroupReqInput": ("DestroyWeightsUpdateGroupReqOutput", "weight updates"),
    "UpdateWeightsFromDistributedReqInput": ("UpdateWeightsFromDistributedReqOutput", "weight updates"),
    "UpdateWeightsFromTensorReqInput": ("UpdateWeightsFromTensorReqOutput", "weight updates"),
    "UpdateWeightsFromIPCReqInput": ("UpdateWeightsFromIPCReqOutput", "weight updates"),
    "BeginWeightUpdateReqInput": ("BeginWeightUpdateReqOutput", "weight updates"),
    "EndWeightUpdateReqInput": ("EndWeightUpdateReqOutput", "weight updates"),
    "InitWeightsSendGroupForRemoteInstanceReqInput": (
        "InitWeightsSendGroupForRemoteInstanceReqOutput",
        "sending weights to remote instances",
    ),
    "SendWeightsToRemoteInstanceReqInput": (
        "SendWeightsToRemoteInstanceReqOutput",
        "sending weights to remote instances",
    ),
    "CheckWeightsReqInput": ("CheckWeightsReqOutput", "weight checksums"),
    "ProfileReq": ("ProfileReqOutput", "profiling"),
    "LoadLoRAAdapterReqInput": ("LoRAUpdateOutput", "LoRA adapters"),
    "UnloadLoRAAdapterReqInput": ("LoRAUpdateOutput", "LoRA adapters"),
    "LoadLoRAAdapterFromTensorsReqInput": ("LoRAUpdateOutput", "LoRA adapters"),
    "ScaleElasticEPReqInput": ("ScaleElasticEPReqOutput", "elastic expert parallelism"),
    "AddExternalCorpusReqInput": ("AddExternalCorpusReqOutput", "ngram speculative decoding"),
    "RemoveExternalCorpusReqInput": ("RemoveExternalCorpusReqOutput", "ngram speculative decoding"),
    "ListExternalCorporaReqInput": ("ListExternalCorporaReqOutput", "ngram speculative decoding"),
    "DumperControlReqInput": ("DumperControlReqOutput", "the tensor dumper"),
    "PdRoleSwitchReqInput": ("PdRoleSwitchReqOutput", "PD role switching"),
    "RpcReqInput": ("RpcReqOutput", "RPC calls"),
    "OpenSessionReqInput": ("OpenSessionReqOutput", "sessions"),
    "ExpertDistributionReq": ("ExpertDistributionReqOutput", "expert distribution recording"),
    "ReleaseMemoryOccupationReqInput": ("ReleaseMemoryOccupationReqOutput", "releasing memory"),
    "ResumeMemoryOccupationReqInput": ("ResumeMemoryOccupationReqOutput", "releasing memory"),
}
# Messages that expect no reply; they are logged and dropped.
IGNORED = frozenset(
    {
        "CloseSessionReqInput",
        "TokenizerWorkerRegistrationReq",
        "PauseContinueBroadcastReq",
        "ActiveRanksOutput",
        "ElasticScaleUpdateReq",
        "EncoderDispatchErrorReq",
        "BlockReqInput",
    }
)
# SetInternalStateReq keys this scheduler applies live (EngineConfig fields read every step).
SETTABLE = {"max_running_requests": int, "chunked_prefill_size": int}


def unsupported_message(feature: str) -> str:
    return f"not supported by the Adrenaline scheduler: {feature}"


def find_parameter(model, name: str):
    """A parameter by our name or SGLang's (``model.layers.0.self_attn.qkv_proj.weight``)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    ours = name.removeprefix("model.").replace(".self_attn.", ".").replace(".mlp.", ".")
    return params.get(name, params.get(ours))


def failure_reply(reply_cls: type, message: str, **fields: Any) -> Any:
    """``reply_cls`` with success=False and ``message`` in whichever message field it has."""
    kwargs: dict[str, Any] = {}
    for f in msgspec.structs.fields(reply_cls):
        if f.name in fields:
            kwargs[f.name] = fields[f.name]
        elif f.name == "success":
            kwargs[f.name] = False
        elif f.name in ("message", "error_message", "error"):
            kwargs[f.name] = message
        elif f.required:
            kwargs[f.name] = [] if f.name == "response" else None
    return reply_cls(**kwargs)


class ControlHandler:
    """Serves one control message at a time for the scheduler loop.

    ``holders`` are what hold requests (the scheduler; a PD role's transfers first, when there is
    one), ``reply(output, request)`` answers on the TokenizerManager's socket, ``forward(msg)`` passes a
    message on to the detokenizer, ``emit(req)`` reports a request finished outside a step (abort),
    ``internal_state()`` describes the scheduler for ``/server_info``.
    """

    def __init__(
        self,
        scheduler,
        holders: list,
        reply: Callable[[Any, Any], None],
        forward: Callable[[Any], None],
        emit: Callable[[Req], None],
        internal_state: Callable[[], dict],
        model=None,
    ) -> None:
        self.scheduler = scheduler
        self.holders = holders  # who holds requests: requests() and abort(rid, reason), PD first
        self.reply, self.forward, self.emit = reply, forward, emit
        self.internal_state = internal_state
        self.model = model
        self.paused = False
        self.shutdown = False
        self.forward_sleep: float | None = None
        self._pending_flush: tuple[Any, float] | None = None

    def handle(self, msg: Any) -> None:
        name = type(msg).__name__
        method = getattr(self, f"_on_{name}", None)
        if method is not None:
            method(msg)
        elif name in UNSUPPORTED:
            reply_name, feature = UNSUPPORTED[name]
            text = unsupported_message(feature)
            logger.warning("%s refused: %s", name, text)
            self.reply(self._failure(msg, getattr(io, reply_name), text), msg)
        elif name in IGNORED:
            logger.warning("%s ignored: not used by the Adrenaline scheduler", name)
        else:
            self._unknown(msg, name)

    def _failure(self, msg: Any, reply_cls: type, text: str) -> Any:
        if reply_cls is io.OpenSessionReqOutput:
            return io.OpenSessionReqOutput(session_id=msg.session_id, success=False)
        if reply_cls is io.PdRoleSwitchReqOutput:
            return failure_reply(
                reply_cls, text, old_role="null", new_role=msg.new_role, safe_to_restore=True
            )
        return failure_reply(reply_cls, text)

    def _unknown(self, msg: Any, name: str) -> None:
        """A message type added after sglang 0.5.23: answer it if it has an obvious reply type."""
        for suffix in ("ReqInput", "Req"):
            if name.endswith(suffix):
                reply_cls = getattr(io, name[: -len(suffix)] + "ReqOutput", None)
                if reply_cls is not None:
                    text = unsupported_message(name)
                    logger.error("unknown control request %s: answered with failure", name)
                    self.reply(failure_reply(reply_cls, text), msg)
                    return
        logger.error("unknown message %s from the TokenizerManager: dropped", name)

    # ---- supported requests -------------------------------------------------------------------
    def _on_AbortReq(self, msg: io.AbortReq) -> None:
        """Abort by rid prefix (SGLang's rule) or all; the client sees SGLang's abort reason."""
        held = [r for h in self.holders for r in h.requests()]
        rids = {r.rid for r in held if msg.abort_all or r.rid.startswith(msg.rid or "\0")}
        if msg.finished_reason:
            reason = dict(msg.finished_reason)
        elif msg.abort_message:
            reason = {"type": "abort", "message": msg.abort_message, "status_code": 503}
        else:
            reason = {"type": "abort", "message": "Aborted", "status_code": None}
        if rids:
            logger.info("abort %s: %d request(s)", "all" if msg.abort_all else repr(msg.rid), len(rids))
        for rid in rids:
            for holder in self.holders:
                for req in holder.abort(rid, reason):
                    self.emit(req)

    def _on_FlushCacheReqInput(self, msg: io.FlushCacheReqInput) -> None:
        if self._pending_flush is not None:
            self.reply(io.FlushCacheReqOutput(success=False, message="another flush is in progress"), msg)
        elif self.scheduler.has_work and (msg.timeout_s or 0) > 0:
            self._pending_flush = (msg, time.monotonic() + msg.timeout_s)
        else:
            self.reply(self._flush(), msg)

    def _flush(self) -> io.FlushCacheReqOutput:
        s = self.scheduler
        if s.has_work or not s.allocator.flush():
            text = (
                f"cache not flushed: {len(s.running)} running and {len(s.waiting)} waiting requests "
                "hold KV pages; retry when idle or pass a timeout"
            )
            return io.FlushCacheReqOutput(success=False, message=text)
        return io.FlushCacheReqOutput(success=True, message="cache flushed")

    def check_pending(self) -> None:
        """Answer a deferred flush once idle or at its deadline."""
        if self._pending_flush is None:
            return
        msg, deadline = self._pending_flush
        if not self.scheduler.has_work or time.monotonic() >= deadline:
            self._pending_flush = None
            self.reply(self._flush(), msg)

    def _on_GetInternalStateReq(self, msg: io.GetInternalStateReq) -> None:
        self.reply(io.GetInternalStateReqOutput(internal_state=self.internal_state()), msg)

    def _on_SetInternalStateReq(self, msg: io.SetInternalStateReq) -> None:
        values = dict(msg.server_args or {})
        live = self.scheduler.placement.settable()  # e.g. the static offload ratio
        placed = {k: values.pop(k) for k in list(values) if k in live}
        bad = sorted(k for k in values if k not in SETTABLE)
        ok = not bad and all(isinstance(v, (int, float)) and v >= 1 for v in values.values())
        try:
            for k, v in placed.items() if ok else ():
                live[k](v)
        except (TypeError, ValueError) as e:
            logger.warning("SetInternalStateReq refused: %s", e)
            ok = False
        if ok:
            for k, v in values.items():
                setattr(self.scheduler.config, k, SETTABLE[k](v))
            logger.info("internal state updated: %s", {**values, **placed})
        else:
            keys = sorted({*SETTABLE, *live})
            logger.warning("SetInternalStateReq refused: settable keys are %s (config ones >= 1)", keys)
        self.reply(io.SetInternalStateReqOutput(updated=ok), msg)

    def _on_GetWeightsByNameReqInput(self, msg: io.GetWeightsByNameReqInput) -> None:
        p = find_parameter(self.model, msg.name) if self.model is not None else None
        if p is None:
            logger.warning("get_weights_by_name: no parameter %r", msg.name)
        if p is not None and p.is_mkldnn:  # a packed projection weight (pack_linear_weight)
            p = p.to_dense()
        value = None if p is None else p.detach().float()[: msg.truncate_size].tolist()
        self.reply(io.GetWeightsByNameReqOutput(parameter=value), msg)

    def _on_GetHiCacheL3LayoutReq(self, msg: io.GetHiCacheL3LayoutReq) -> None:
        layout = {
            "enabled": False,
            "backend": None,
            "page_size": self.scheduler.page_size,
            "hicache_object_layout": {"pools": []},
            "reason": unsupported_message("hierarchical cache"),
        }
        self.reply(io.GetHiCacheL3LayoutReqOutput(layout=layout), msg)

    def _on_SlowDownReqInput(self, msg: io.SlowDownReqInput) -> None:
        t = msg.forward_sleep_time
        self.forward_sleep = t if t is not None and t > 0 else None
        self.reply(io.SlowDownReqOutput(), msg)

    def _on_UpdateWeightVersionReqInput(self, msg: io.UpdateWeightVersionReqInput) -> None:
        if msg.abort_all_requests:
            self._on_AbortReq(io.AbortReq(abort_all=True))
        self.reply(io.UpdateWeightVersionReqOutput(), msg)

    def _on_PauseGenerationReqInput(self, msg: io.PauseGenerationReqInput) -> None:
        self.paused = True  # "retract" keeps KV too: resuming then costs nothing

    def _on_ContinueGenerationReqInput(self, msg: io.ContinueGenerationReqInput) -> None:
        self.paused = False

    def _on_FreezeGCReq(self, msg: io.FreezeGCReq) -> None:
        gc.freeze()
        self.forward(msg)  # the detokenizer freezes its own GC on it, as with SGLang's scheduler

    def _on_ConfigureLoggingReq(self, msg: io.ConfigureLoggingReq) -> None:
        if msg.log_level is not None:
            logging.getLogger().setLevel(msg.log_level.upper())
        self.forward(msg)

    def _on_ShutdownReq(self, msg: io.ShutdownReq) -> None:
        self.shutdown = True
