"""GPU presets and the efficiency assumptions of the analytic cost model.

Peak figures are the vendors' datasheet numbers (dense bf16, no sparsity; NVLink per direction).
Everything a datasheet does not give is an ``Assumptions`` field with its reason, so a reader can
see (and a flag can change) every constant the predictions rest on. None was fitted to a result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GiB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    bf16_flops: float  # dense FLOP/s
    link_bw: float  # bytes/s per direction, between the GPUs of a PD pair (NVLink or RDMA)
    link_latency: float  # s, one small message one way


PRESETS: dict[str, GPU] = {
    "a100-80g": GPU("a100-80g", 80 * GiB, 2.039e12, 312e12, 300e9, 10e-6),
    "h100": GPU("h100", 80 * GiB, 3.35e12, 989e12, 450e9, 8e-6),
    "h200": GPU("h200", 141e9, 4.8e12, 989e12, 450e9, 8e-6),
}

RDMA = {"link_bw": 50e9, "link_latency": 5e-6}  # one 400 Gb/s NIC per GPU, between nodes


@dataclass(frozen=True)
class Assumptions:
    # GEMMs of a prefill chunk reach this share of peak FLOP/s (typical large-GEMM MFU).
    prefill_mfu: float = 0.6
    # Decode GEMMs: the same MFU once compute-bound; weights stream at this share of peak bandwidth.
    decode_mfu: float = 0.6
    weight_bw_eff: float = 0.8
    # Paged decode attention reads KV at this share of peak bandwidth (FlashInfer-class kernels).
    attn_bw_eff: float = 0.7
    # Executor under an SM cap s gets min(1, s / sat) of the attention bandwidth; the paper's A100
    # figure (20 % of SMs reach ~60 % of HBM bandwidth) gives a linear rise saturating at 1/3.
    exec_bw_saturation_share: float = 1 / 3
    # While offloaded work exists, prefill keeps (1 - s) of the SMs: linear, i.e. pessimistic (the
    # paper finds prefill latency grows sublinearly as its share shrinks).
    prefill_sm_exponent: float = 1.0
    # Fixed per forward pass: scheduling, sampling and launch overhead (CUDA graphs on decode).
    step_overhead_s: float = 0.5e-3
    # Usable HBM share (SGLang's mem_fraction_static) and a per-GPU activation/graph workspace.
    mem_fraction: float = 0.9
    workspace_bytes: float = 4 * GiB


def gpu(name: str, link: str = "nvlink") -> GPU:
    if name not in PRESETS:
        raise ValueError(f"unknown hardware {name!r}; presets: {sorted(PRESETS)}")
    g = PRESETS[name]
    return replace(g, **RDMA) if link == "rdma" else g
