"""The scheduler process SGLang's ``launch_server`` runs in place of its own.

It loads the model, answers the startup handshake, then loops: drain every pending message from
the TokenizerManager (blocking briefly only when idle), run one ``Scheduler.step``, send one
``BatchTokenIDOutput`` with every request that progressed, answer control requests. Sockets,
handshake and process hygiene follow SGLANG_FRONTEND_CONTRACT.md.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import time
from typing import Any

import psutil
import setproctitle
import zmq
from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX
from sglang.srt.managers import io_struct as io
from sglang.srt.utils.network import get_zmq_socket

from adrenaline.core.request import Req, finish_abort
from adrenaline.models.default_model import resolve_model_path
from adrenaline.procs import die_with_parent
from adrenaline.runner.model_runner import ModelRunner
from adrenaline.server.args import AdrenalineArgs, engine_config
from adrenaline.server.control import ControlHandler
from adrenaline.server.io_convert import OutputBatch, rejected_req, req_from_tokenized
from adrenaline.server.roles import build_role
from adrenaline.server.state import LoadPublisher, SchedulerState
from adrenaline.server.validate import check_parallel_samples

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50  # how long an idle loop waits for a message before its housekeeping tick


class SchedulerProcess:
    def __init__(self, server_args: Any, port_args: Any, ours: AdrenalineArgs) -> None:
        tic = time.perf_counter()
        self.config = engine_config(server_args, ours.enable_deterministic_inference)
        model_path = resolve_model_path(self.config.model_path)
        tokenizer = None
        if not self.config.skip_tokenizer_init:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                self.config.tokenizer_path or model_path, trust_remote_code=server_args.trust_remote_code
            )
        self.runner = ModelRunner(self.config, model_path, show_progress=False)
        self.outputs = OutputBatch()
        self.role = build_role(server_args, ours, self.runner, tokenizer, self._emit, self.config)
        self.scheduler, self.pd = self.role.scheduler, self.role.pd
        self.context_len = self.runner.model_config.context_len

        ctx = zmq.Context(2)
        self.recv = get_zmq_socket(ctx, zmq.PULL, port_args.scheduler_input_ipc_name, False)
        self.to_tokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_ipc_name, False)
        # With --skip-tokenizer-init there is no detokenizer: outputs go straight to the tokenizer.
        out_name = (
            port_args.tokenizer_ipc_name
            if self.config.skip_tokenizer_init
            else port_args.detokenizer_ipc_name
        )
        self.to_detokenizer = get_zmq_socket(ctx, zmq.PUSH, out_name, False)
        self.ctx = ctx

        weight_bytes = sum(p.numel() * p.element_size() for p in self.runner.model.parameters())
        self.startup_time = {
            **self.runner.startup_s,
            "scheduler_e2e": time.perf_counter() - tic,
            "cuda_graph": {},
        }
        info = {
            "model_path": model_path,
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "device": self.config.device,
            "attention_backend": self.config.attention_backend,
            "context_len": self.context_len,
            "weight_gb": weight_bytes / 2**30,
            "kv_cache_gb": self.runner.pool.nbytes() / 2**30,
            "scheduler_startup_time": self.startup_time,
        }
        self.max_parallel_samples = ours.max_parallel_samples
        self.health_checks: list[io.TokenizedGenerateReqInput] = []  # answered after the next step
        self.poller = zmq.Poller()
        self.poller.register(self.recv, zmq.POLLIN)
        if self.pd is not None:
            self.poller.register(self.pd.transport.pollable, zmq.POLLIN)
        self.state = SchedulerState(self.scheduler, info, self.pd, paused=lambda: self.control.paused)
        self.loads = LoadPublisher(port_args, self.state)
        self.metrics = None
        if server_args.enable_metrics:
            from adrenaline.server.metrics import SchedulerMetrics

            self.metrics = SchedulerMetrics(self.state, server_args.served_model_name or model_path)
        self.control = ControlHandler(
            self.scheduler,
            [self.pd, self.scheduler] if self.pd is not None else [self.scheduler],
            reply=self._reply,
            forward=lambda msg: io.sock_send(self.to_detokenizer, msg),
            emit=self._emit,
            internal_state=self.state.internal_state,
            model=self.runner.model,
        )

    def init_info(self) -> dict[str, Any]:
        max_tokens = self.runner.max_total_tokens
        return {
            "status": "ready",
            "max_total_num_tokens": max_tokens,
            "max_req_input_len": min(self.context_len, max_tokens) - 1,
            "startup_time": self.startup_time,
        }

    def _emit(self, req: Req) -> None:
        """Report a request in this iteration's output (finished, or streaming)."""
        self.outputs.add(req)

    # ---- messages -----------------------------------------------------------------------------
    def _reply(self, output: Any, request: Any) -> None:
        if getattr(output, "http_worker_ipc", None) is None:
            output.http_worker_ipc = getattr(request, "http_worker_ipc", None)
        io.sock_send(self.to_tokenizer, output)

    def _receive(self, block: bool) -> None:
        """Wait (when idle) for the front end or a PD peer; take every front-end message."""
        if block:
            self.poller.poll(IDLE_POLL_MS)
        while not self.control.shutdown:
            try:
                msg = io.sock_recv(self.recv, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._dispatch(msg)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, io.TokenizedGenerateReqInput):
            self._add(msg)
        elif isinstance(msg, io.BatchTokenizedGenerateReqInput):
            for m in msg.batch:
                self._add(m)
        elif isinstance(msg, (io.TokenizedEmbeddingReqInput, io.BatchTokenizedEmbeddingReqInput)):
            for m in msg.batch if isinstance(msg, io.BatchTokenizedEmbeddingReqInput) else [msg]:
                reason = finish_abort("embedding requests are not supported by this server", 400)
                self._reply(io.AbortReq(rid=m.rid, finished_reason=reason), m)
        else:
            self.control.handle(msg)

    def _add(self, msg: io.TokenizedGenerateReqInput) -> None:
        if str(msg.rid).startswith(HEALTH_CHECK_RID_PREFIX) and self.scheduler.has_work:
            # As SGLang's scheduler does: a busy loop shows its health by its next step. Queued
            # behind every waiting prompt, the probe (/health) would time out, and the router
            # would take a busy, healthy instance out of service (HTTP 503 to clients).
            self.health_checks.append(msg)
            return
        try:
            check_parallel_samples(msg, self.max_parallel_samples)
            req: Req = req_from_tokenized(msg, self.context_len)
            (self.pd or self.scheduler).add_request(req)
        except ValueError as e:  # the client's mistake: HTTP 400 with the message
            req = rejected_req(msg, str(e))
        except Exception as e:  # ours: fail this request, keep serving the others
            logger.exception("request %s could not be admitted", msg.rid)
            req = rejected_req(msg, f"internal error admitting the request: {e}", 500)
        if req.finished:
            self._emit(req)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        s, control = self.scheduler, self.control
        was_busy, stalled = False, False
        while not control.shutdown:
            # Stalled: the last step ran nothing (requests wait for pages or PD peers), so sleep
            # until a message arrives instead of spinning.
            busy = (s.has_work and not control.paused and not stalled) or len(self.outputs) > 0
            self._receive(block=not busy)
            if control.shutdown:
                break
            if self.pd is not None:
                self.pd.tick()
            s.placement.tick()
            if s.has_work and not control.paused:
                if control.forward_sleep:
                    time.sleep(control.forward_sleep)
                passes = s.stats.forward_passes
                progressed = s.step()
                stalled = s.stats.forward_passes == passes
                if self.pd is not None:
                    progressed = self.pd.after_step(progressed)
                for req in progressed:
                    self._emit(req)
                self.state.throughput.record(s.stats.generated_tokens)
            if len(self.outputs):
                io.sock_send(self.to_detokenizer, self.outputs.build())
                self.outputs = OutputBatch()
            for msg in self.health_checks:
                self._reply(io.HealthCheckOutput(rid=msg.rid), msg)
            self.health_checks.clear()
            control.check_pending()
            went_idle = was_busy and not s.has_work
            was_busy = s.has_work
            self.loads.maybe_publish(force=went_idle)
            if self.metrics is not None:
                self.metrics.maybe_log(force=went_idle)

    def close(self) -> None:
        self.loads.close()
        self.role.close()
        for sock in (self.recv, self.to_tokenizer, self.to_detokenizer):
            sock.close(linger=0)
        self.ctx.term()


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=(level or "info").upper(),
        format="[%(asctime)s adrenaline scheduler] %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )


def run_scheduler_process(
    server_args: Any,
    port_args: Any,
    gpu_id: int,
    tp_rank: int,
    pp_rank: int,
    dp_rank: int | None,
    pipe_writer: Any,
    *args: Any,
    adrenaline_args: AdrenalineArgs | None = None,
    **kwargs: Any,
) -> None:
    """SGLang's ``run_scheduler_process_func``: runs until ``ShutdownReq`` or the parent dies."""
    die_with_parent()
    setproctitle.setproctitle("sglang::scheduler")  # SGLang's SIGTERM path finds schedulers by it
    faulthandler.enable()
    _configure_logging(server_args.log_level)
    parent = psutil.Process().parent()
    # SIGTERM to the whole process group (not just the server) must still unlink our files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        proc = SchedulerProcess(server_args, port_args, adrenaline_args or AdrenalineArgs())
    except Exception as e:
        logger.exception("scheduler failed to start")
        pipe_writer.send({"status": "error", "message": f"{type(e).__name__}: {e}"})
        return
    pipe_writer.send(proc.init_info())
    logger.info(
        "ready: %s on %s, KV pool %d tokens",
        proc.state.info["model_path"],
        proc.config.device,
        proc.runner.max_total_tokens,
    )
    try:
        proc.run()
        logger.info("shutdown requested: exiting")
    except Exception:
        logger.exception("scheduler crashed")
        parent.send_signal(signal.SIGQUIT)  # SGLang's launcher then tears the server down
    finally:
        proc.close()
