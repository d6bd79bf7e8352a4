"""The role a scheduler process plays, wired once: a single instance; a PD prefill side, maybe
hosting an attention executor; or a PD decode side, maybe offloading attention to executors.

It builds the scheduler with its ``Placement`` (an ``OffloadManager`` on an offloading decode
instance) and the PD role's manager, which plugs into the scheduler's hooks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from adrenaline.core.profile import Profile
from adrenaline.disaggregation.bootstrap import register_prefill
from adrenaline.disaggregation.common import TransferManager
from adrenaline.disaggregation.decode import DecodeTransfers
from adrenaline.disaggregation.prefill import PrefillTransfers
from adrenaline.kv_cache.pool import KVPool
from adrenaline.models.default_model import resolve_model_path
from adrenaline.offload.colocation import CoreSplit, choose_executor_threads, split_cores
from adrenaline.offload.link import ExecutorLink
from adrenaline.offload.load_aware import Slo
from adrenaline.offload.load_aware_offload import LoadAwareOffload
from adrenaline.offload.manager import OffloadManager
from adrenaline.offload.policy import OffloadPolicy, StaticRatioPolicy
from adrenaline.offload.process import start_executor
from adrenaline.offload.profile_source import resolve_profile
from adrenaline.offload.supervisor import ExecutorSupervisor
from adrenaline.runner.model_runner import ModelRunner
from adrenaline.scheduler.scheduler import Scheduler
from adrenaline.server.args import AdrenalineArgs
from adrenaline.server.data_plane import DataPlane, data_plane, offload_exchange

logger = logging.getLogger(__name__)


@dataclass
class Role:
    scheduler: Scheduler
    pd: TransferManager | None = None
    supervisor: ExecutorSupervisor | None = None  # keeps this prefill instance's executor running

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.terminate()
        if self.pd is not None:
            self.pd.transport.close()
            self.pd.mover.close()


def build_role(server_args: Any, ours: AdrenalineArgs, runner: ModelRunner, tokenizer, emit, config) -> Role:
    """``emit(req)`` reports a request the PD role finished or advanced outside a step."""
    mode = server_args.disaggregation_mode
    if mode not in ("prefill", "decode"):
        return Role(Scheduler(runner, config, tokenizer))
    plane = data_plane(ours, server_args.host)
    transport, mover = plane.transport, plane.mover(runner.pool)
    if mode == "decode":
        placement = None
        policy = _offload_policy(ours, runner, config)
        if policy is not None:
            mc = runner.model_config
            heads = (mc.num_heads, mc.num_kv_heads, mc.head_dim)
            rows = ours.max_offloaded_requests or config.max_running_requests
            exchange = offload_exchange(ours, plane, heads, runner.dtype, rows, runner.device)
            placement = OffloadManager(policy, exchange, ours.offload_timeout)
        scheduler = Scheduler(runner, config, tokenizer, placement)
        loads = placement.prefill_load if placement is not None else None
        pd = DecodeTransfers(scheduler, runner.pool, transport, ours.pd_timeout, emit, mover, loads=loads)
        return Role(scheduler, pd)
    scheduler = Scheduler(runner, config, tokenizer)
    role = Role(scheduler)
    executor = None
    if ours.enable_attention_offload:
        executor, role.supervisor = _start_executor(ours, runner, config, plane)
    register_prefill(
        server_args.host,
        server_args.disaggregation_bootstrap_port,
        transport.address,
        runner.page_size,
        str(runner.dtype).removeprefix("torch."),
        server_args.port,
    )
    args = (scheduler, runner.pool, transport, ours.pd_timeout, emit, mover)
    role.pd = PrefillTransfers(*args, executor=executor)
    return role


def _profile(ours: AdrenalineArgs, runner: ModelRunner, config) -> Profile:
    device = "cpu" if runner.device.type == "cpu" else torch.cuda.get_device_name(runner.device)
    dtype = str(runner.dtype).removeprefix("torch.")
    model = resolve_model_path(config.model_path)
    return resolve_profile(ours.offload_profile, model, dtype, runner.model_config.num_layers, device)


def _offload_policy(ours: AdrenalineArgs, runner: ModelRunner, config) -> OffloadPolicy | None:
    """The decode side's offload policy (None: offloading off)."""
    if ours.attention_offload_policy == "static":
        ratio = ours.attention_offload_ratio or 0.0
        return StaticRatioPolicy(ratio, ours.max_offloaded_requests) if ratio > 0 else None
    slo = Slo(ours.tpot_slo_ms, ours.ttft_slo_ms)
    return LoadAwareOffload(_profile(ours, runner, config), slo, ours.offload_step_margin)


def _core_split(ours: AdrenalineArgs, runner: ModelRunner, config, pool: KVPool) -> CoreSplit | None:
    """``--executor-cores`` on CPU: the executor's cores and this prefill scheduler's (None: unpinned).
    ``auto`` sizes the executor for its whole pool at the running cap, hidden under the same load's
    local attention: the offload ratio 1 a decode instance would run at most of the time."""
    if ours.executor_cores is None or runner.device.type != "cpu":
        return None
    cores = sorted(os.sched_getaffinity(0))
    threads = ours.executor_cores
    if threads == "auto":
        profile = _profile(ours, runner, config)
        batch, context = config.max_running_requests, pool.num_slots
        budget = profile.local_attention_ms(batch, context)
        threads = choose_executor_threads(profile, len(cores), batch, context, budget)
    split = split_cores(cores, int(threads))
    logger.info("attention executor on cores %s, prefill scheduler on %s", split.executor, split.prefill)
    return split


def _start_executor(
    ours: AdrenalineArgs, runner: ModelRunner, config, plane: DataPlane
) -> tuple[ExecutorLink, ExecutorSupervisor]:
    """The attention executor beside this prefill instance, over a pool shared with it."""
    mc = runner.model_config
    tokens = ours.executor_max_total_tokens or runner.max_total_tokens
    pool = KVPool(mc, max(tokens // runner.page_size, 1), runner.page_size, runner.dtype, runner.device)
    split = _core_split(ours, runner, config, pool)
    if split is not None:
        torch.set_num_threads(len(split.prefill))

    def start() -> tuple[Any, str]:
        proc, address = start_executor(
            pool,
            mc.num_heads,
            mc.num_kv_heads,
            config.attention_backend,
            plane.transport_args,
            ours.executor_sm_percent,
            len(split.executor) if split is not None else 1,
            plane.engine_args,
        )
        if split is not None:  # again for each restarted executor
            split.apply(proc.pid, os.getpid())
        return proc, address

    proc, address = start()
    logger.info("attention executor at %s: %d KV tokens", address, pool.num_slots)
    link = ExecutorLink(plane.transport, address, runner.pool, pool)
    return link, ExecutorSupervisor(start, proc, link)
