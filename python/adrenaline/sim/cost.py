"""Cost models: how long a forward pass, an attention, an exchange or a KV transfer takes.

``CostModel`` is the interface the cluster model uses; ``AnalyticCost`` derives it from a GPU's
datasheet figures (roofline: max of the compute time and the memory time) and the stated
``Assumptions``. A measured profile (``python -m adrenaline.profile``) implements the same
interface (``profiled.py``). ``decode_step_time`` composes one decode step the way the runtime
runs it: per layer, the offloaded group's exchange and remote attention overlap the local
attention, so a step costs dense + max(local attention, remote attention + exchange).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from adrenaline.sim.hardware import GPU, Assumptions
from adrenaline.sim.model import ModelSpec


class CostModel(Protocol):
    model: ModelSpec

    def prefill_time(self, tokens: int, attn_pairs: float, exec_share: float = 0.0) -> float:
        """A prefill forward of ``tokens`` new tokens; ``attn_pairs``: sum over chunks of new tokens
        times their mean context; ``exec_share``: SM share held by a busy colocated executor."""

    def dense_time(self, rows: int) -> float:
        """A decode forward's non-attention part (projections, MLP, LM head, sampling, step
        overhead) for ``rows`` tokens."""

    def attention_time(self, rows: int, context: int) -> float:
        """Local decode attention over all layers for ``rows`` requests holding ``context`` tokens."""

    def executor_time(self, rows: int, context: int, share: float) -> float:
        """The same attention on an attention executor holding ``share`` of the prefill GPU."""

    def exchange_time(self, rows: int) -> float:
        """Per decode step, all layers: ship the offloaded rows' q/k/v out and the outputs back."""

    def kv_transfer_time(self, tokens: int) -> float:
        """PD: move a prompt's KV from the prefill to the decode instance."""

    def kv_capacity_tokens(self) -> int:
        """KV tokens an instance's memory holds next to its weights."""


def decode_step_time(
    cost: CostModel,
    local_rows: int,
    local_context: int,
    remote: Sequence[tuple[int, int, float, int]] = (),
    extend: tuple[int, float] = (0, 0.0),
) -> tuple[float, float, float]:
    """(step, local attention, remote attention + exchange) of one decode step.

    ``remote``: per executor, (rows, context, SM share, decode instances sharing it; the
    executor's bandwidth is split evenly between them). ``extend``: (tokens, attention pairs) of
    recomputed (retracted) prompts in the same batch.
    """
    remote_rows = sum(r[0] for r in remote)
    local = cost.attention_time(local_rows, local_context) if local_rows else 0.0
    far = 0.0
    if remote_rows:
        far = max(cost.executor_time(r, c, s) * n for r, c, s, n in remote if r)
        far += cost.exchange_time(remote_rows)
    rows = local_rows + remote_rows
    step = (cost.dense_time(rows) if rows else 0.0) + max(local, far)
    if extend[0]:
        step += cost.prefill_time(*extend)
    return step, local, far


class AnalyticCost:
    """Roofline costs of one instance of ``tp`` GPUs (tensor parallel, NVLink all-reduces)."""

    def __init__(self, model: ModelSpec, gpu: GPU, tp: int = 1, assume: Assumptions | None = None) -> None:
        self.model, self.gpu, self.tp = model, gpu, tp
        self.a = assume or Assumptions()

    def _allreduce(self, rows: int) -> float:
        if self.tp == 1:
            return 0.0
        nbytes = rows * self.model.hidden * self.model.dtype_bytes
        ring = 2 * (self.tp - 1) / self.tp * nbytes / self.gpu.link_bw
        return 2 * self.model.layers * (ring + 2 * (self.tp - 1) * self.gpu.link_latency)

    def _gemm(self, rows: int, mfu: float) -> float:
        flops = 2 * self.model.matmul_params * rows / (self.tp * self.gpu.bf16_flops * mfu)
        weights = self.model.weight_bytes / (self.tp * self.gpu.hbm_bw * self.a.weight_bw_eff)
        return max(flops, weights) + self._allreduce(rows)

    def prefill_time(self, tokens: int, attn_pairs: float, exec_share: float = 0.0) -> float:
        m = self.model
        attn_flops = 4 * m.layers * m.heads * m.head_dim * attn_pairs
        sm = (1.0 - exec_share) ** self.a.prefill_sm_exponent
        attn = attn_flops / (self.tp * self.gpu.bf16_flops * self.a.prefill_mfu)
        return (self._gemm(tokens, self.a.prefill_mfu) + attn) / sm + self.a.step_overhead_s

    def dense_time(self, rows: int) -> float:
        return self._gemm(rows, self.a.decode_mfu) + self.a.step_overhead_s

    def _kv_read(self, rows: int, context: int, bw: float) -> float:
        m = self.model
        qo = rows * m.layers * 2 * m.heads * m.head_dim * m.dtype_bytes
        return (context * m.kv_bytes_per_token + qo) / (self.tp * bw)

    def attention_time(self, rows: int, context: int) -> float:
        return self._kv_read(rows, context, self.gpu.hbm_bw * self.a.attn_bw_eff)

    def executor_time(self, rows: int, context: int, share: float) -> float:
        frac = min(1.0, share / self.a.exec_bw_saturation_share)
        return self._kv_read(rows, context, self.gpu.hbm_bw * self.a.attn_bw_eff * frac)

    def exchange_time(self, rows: int) -> float:
        wire = rows * self.model.exchange_bytes_per_row / (self.tp * self.gpu.link_bw)
        per_layer = 2 * self.gpu.link_latency + wire
        return self.model.layers * per_layer + self.gpu.link_latency  # + the step's metadata

    def kv_transfer_time(self, tokens: int) -> float:
        return tokens * self.model.kv_bytes_per_token / (self.tp * self.gpu.link_bw) + self.gpu.link_latency

    def kv_capacity_tokens(self) -> int:
        usable = self.tp * (self.gpu.hbm_bytes * self.a.mem_fraction - self.a.workspace_bytes)
        return max(int((usable - self.model.weight_bytes) // self.model.kv_bytes_per_token), 0)

    @property
    def hbm_bytes(self) -> float:
        return self.tp * self.gpu.hbm_bytes

    @property
    def hbm_bw(self) -> float:
        return self.tp * self.gpu.hbm_bw
