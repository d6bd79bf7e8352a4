"""SGLang ``ServerArgs`` -> our ``EngineConfig``, and the flags this scheduler cannot honour.

Only flags the user gave count: SGLang resolves unset flags to defaults tuned for its own GPU
scheduler (page size 1, a random seed, 71% of memory...). Those resolved values live apart from
the raw attributes, which stay ``None`` when unset, so reading the raw attributes keeps our own
defaults (``EngineConfig``) for everything the user did not choose.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from adrenaline.config import EngineConfig
from adrenaline.offload.load_aware import MARGIN
from adrenaline.transport.mooncake_engine import mooncake_missing

# SGLang --attention-backend -> ours. "torch" is our name; SGLang's CLI spells it torch_native.
ATTENTION_BACKENDS = {
    None: "auto",
    "torch_native": "torch",
    "torch": "torch",
    "flashinfer": "flashinfer",
    "triton": "triton",
}
DTYPES = {"half": "float16", "float": "float32"}
# ServerArgs attribute -> EngineConfig field, copied when the user set it.
PASSTHROUGH = {
    "page_size": "page_size",
    "max_total_tokens": "max_total_tokens",
    "mem_fraction_static": "mem_fraction_static",
    "max_running_requests": "max_running_requests",
    "max_prefill_tokens": "max_prefill_tokens",
    "tokenizer_path": "tokenizer_path",
}


def unsupported_flags(sa: Any) -> list[str]:
    """Human-readable reasons this configuration cannot be served (empty when it can)."""
    problems = []
    for flag, value in (("--tp-size", sa.tp_size), ("--pp-size", sa.pp_size), ("--dp-size", sa.dp_size)):
        if (value or 1) != 1:
            problems.append(f"{flag} {value}: the Adrenaline scheduler runs one model replica on one device")
    if getattr(sa, "nnodes", 1) != 1:
        problems.append("--nnodes: multi-node serving is not supported")
    if getattr(sa, "enable_dp_attention", False):
        problems.append("--enable-dp-attention is not supported")
    if sa.is_embedding:
        problems.append("--is-embedding: embedding models are not supported")
    if sa.enable_lora:
        problems.append("--enable-lora: LoRA adapters are not supported")
    if getattr(sa, "speculative_algorithm", None):
        problems.append("--speculative-algorithm: speculative decoding is not supported")
    if getattr(sa, "enable_hierarchical_cache", False):
        problems.append("--enable-hierarchical-cache is not supported")
    if (getattr(sa, "tokenizer_worker_num", 1) or 1) != 1:
        problems.append("--tokenizer-worker-num > 1 is not supported")
    if sa.disaggregation_mode not in (None, "null") and sa.disaggregation_transfer_backend != "mooncake":
        problems.append(
            f"--disaggregation-transfer-backend {sa.disaggregation_transfer_backend}: Adrenaline moves KV "
            "with its own transport (--pd-transport) and uses the default (mooncake) backend's bootstrap "
            "server only to find peers; leave the flag unset"
        )
    if sa.attention_backend not in ATTENTION_BACKENDS:
        choices = ", ".join(k for k in ATTENTION_BACKENDS if k)
        problems.append(f"--attention-backend {sa.attention_backend}: choose one of {choices}")
    return problems


def engine_config(sa: Any, deterministic: bool = False) -> EngineConfig:
    """The ``EngineConfig`` for the flags the user set on ``sa`` (raw, unresolved values);
    ``deterministic``: batch-invariant kernels even when ``sa`` no longer carries the flag."""
    deterministic = deterministic or bool(getattr(sa, "enable_deterministic_inference", False))
    kw: dict[str, Any] = {
        "model_path": sa.model_path,
        "skip_tokenizer_init": bool(sa.skip_tokenizer_init),
        "dtype": DTYPES.get(sa.dtype, sa.dtype or "auto"),
        "device": sa.device or "auto",
        "attention_backend": ATTENTION_BACKENDS[sa.attention_backend],
        "enable_prefix_caching": not sa.disable_radix_cache,
        "cuda_graph": not getattr(sa, "disable_cuda_graph", False),
        "enable_deterministic_inference": deterministic,
    }
    for src, dst in PASSTHROUGH.items():
        value = getattr(sa, src, None)
        if value is not None:
            kw[dst] = value
    if sa.chunked_prefill_size is not None:
        # SGLang's -1 turns chunking off: one pass may then take a whole max_prefill_tokens prompt.
        chunk = sa.chunked_prefill_size
        kw["chunked_prefill_size"] = chunk if chunk > 0 else kw.get("max_prefill_tokens", 16384)
    return EngineConfig(**kw)


@dataclass
class AdrenalineArgs:
    """Our flags, beside SGLang's; they reach the scheduler process with its arguments."""

    pd_transport: str = "tcp"
    pd_timeout: float = 60.0
    # SGLang's --enable-deterministic-inference, taken over by our scheduler (``parse_server_args``)
    enable_deterministic_inference: bool = False
    pd_advertise_host: str | None = None
    mooncake_protocol: str = "tcp"
    mooncake_device: str = ""
    enable_attention_offload: bool = False
    attention_offload_ratio: float | None = None
    attention_offload_policy: str | None = None
    offload_profile: str | None = None
    tpot_slo_ms: float | None = None
    ttft_slo_ms: float | None = None
    offload_step_margin: float = MARGIN
    max_offloaded_requests: int | None = None
    executor_max_total_tokens: int | None = None
    executor_sm_percent: int | None = None
    executor_cores: str | None = None
    offload_timeout: float = 10.0
    offload_exchange: str = "auto"
    max_parallel_samples: int = 16

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("Adrenaline")
        group.add_argument(
            "--pd-transport",
            choices=["tcp", "nccl", "mooncake"],
            default=AdrenalineArgs.pd_transport,
            help="PD KV data plane: tcp (host memory, any machine), nccl (GPU to GPU) or mooncake "
            "(one-sided writes over the Mooncake Transfer Engine; also the offload exchange between hosts)",
        )
        group.add_argument(
            "--mooncake-protocol",
            choices=["tcp", "rdma", "nvlink"],
            default=AdrenalineArgs.mooncake_protocol,
            help="--pd-transport mooncake: the engine's protocol (startup fails if it cannot run it)",
        )
        group.add_argument(
            "--mooncake-device",
            default=AdrenalineArgs.mooncake_device,
            help="--pd-transport mooncake, rdma: the RDMA device(s), comma-separated (e.g. mlx5_0)",
        )
        group.add_argument(
            "--pd-timeout",
            type=float,
            default=AdrenalineArgs.pd_timeout,
            help="seconds a PD request waits on its peer instance before it fails (HTTP 5xx)",
        )
        group.add_argument(
            "--pd-advertise-host",
            default=None,
            help="address peers use to reach this instance's transport (default: from --host)",
        )

        group.add_argument(
            "--enable-attention-offload",
            action="store_true",
            help="prefill: start an attention executor that decode instances can offload attention to",
        )
        group.add_argument(
            "--attention-offload-ratio",
            type=float,
            default=None,
            help="decode: target offloaded:local requests (N/M) for the static policy; 0 offloads none, "
            "inf offloads all. Given, the policy defaults to static",
        )
        group.add_argument(
            "--attention-offload-policy",
            choices=["static", "load-aware"],
            default=None,
            help="decode: static (--attention-offload-ratio) or load-aware (offload what does not fit here "
            "while the executor's KV has room and the step stays within --offload-step-margin; the "
            "default without a ratio)",
        )
        group.add_argument(
            "--offload-profile",
            default=None,
            help="decode, load-aware: the profile JSON (python -m adrenaline.profile); default: the "
            "cached one for this model and machine, else a conservative built-in one",
        )
        group.add_argument(
            "--tpot-slo-ms", type=float, default=None, help="decode, load-aware: decode step time bound"
        )
        group.add_argument(
            "--ttft-slo-ms",
            type=float,
            default=None,
            help="decode, load-aware: back off an executor whose prefill's TTFT is above this",
        )
        group.add_argument(
            "--offload-step-margin",
            type=float,
            default=AdrenalineArgs.offload_step_margin,
            help="decode, load-aware: offload only while the predicted decode step stays within "
            "(1 + this) x the step of the local batch alone (the TPOT cost offloading may add)",
        )
        group.add_argument(
            "--max-offloaded-requests", type=int, default=None, help="decode: cap on offloaded requests"
        )
        group.add_argument(
            "--executor-max-total-tokens",
            type=int,
            default=None,
            help="prefill: the attention executor's KV pool in tokens (default: the prefill's pool size)",
        )
        group.add_argument(
            "--executor-sm-percent",
            type=int,
            default=None,
            help="prefill: the attention executor's SM share under MPS (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE "
            "of its process; start MPS with scripts/start_mps.sh; ignored without MPS)",
        )
        group.add_argument(
            "--executor-cores",
            default=None,
            help="prefill, CPU: pin the attention executor to N cores and this prefill scheduler to the "
            "others; 'auto': the fewest that compute a full executor pool's attention within the local "
            "attention it hides under (from the offload profile). Unset: no pinning",
        )
        group.add_argument(
            "--offload-timeout",
            type=float,
            default=AdrenalineArgs.offload_timeout,
            help="decode: seconds to wait for an executor's layer output before recomputing locally",
        )
        group.add_argument(
            "--offload-exchange",
            choices=["auto", "shm", "tcp", "mooncake"],
            default=AdrenalineArgs.offload_exchange,
            help="decode: per-layer data path to executors: shared memory where the executor is on this "
            "host, else Mooncake under --pd-transport mooncake, else TCP (auto); shared memory only (shm; "
            "without it, recompute locally); tcp; mooncake (also on this host)",
        )

        group.add_argument(
            "--max-parallel-samples",
            type=int,
            default=AdrenalineArgs.max_parallel_samples,
            help="largest n (parallel samples) one request may ask for; above it: HTTP 400",
        )

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> AdrenalineArgs:
        sglang_owned = "enable_deterministic_inference"  # SGLang's flag: absent from our parser alone
        args = cls(
            **{f.name: getattr(ns, f.name) for f in fields(cls) if f.name != sglang_owned},
            enable_deterministic_inference=bool(getattr(ns, sglang_owned, False)),
        )
        for name in ("pd_timeout", "offload_timeout"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if "mooncake" in (args.pd_transport, args.offload_exchange):
            missing = mooncake_missing()
            if missing is not None:
                raise ValueError(f"--pd-transport mooncake: {missing}")
        if args.offload_exchange == "mooncake" and args.pd_transport != "mooncake":
            raise ValueError("--offload-exchange mooncake needs --pd-transport mooncake")
        if args.max_parallel_samples < 1:
            raise ValueError("--max-parallel-samples must be at least 1")
        ratio = args.attention_offload_ratio
        if ratio is not None and ratio < 0:
            raise ValueError("--attention-offload-ratio must be >= 0")
        if args.executor_sm_percent is not None and not 0 < args.executor_sm_percent <= 100:
            raise ValueError("--executor-sm-percent must be in (0, 100]")
        cores = args.executor_cores
        if cores is not None and cores != "auto" and not (cores.isdigit() and int(cores) >= 1):
            raise ValueError("--executor-cores must be a positive number of cores or 'auto'")
        if args.attention_offload_policy is None:
            args.attention_offload_policy = "static" if ratio is not None else "load-aware"
        if args.attention_offload_policy == "load-aware" and ratio is not None:
            raise ValueError("--attention-offload-ratio is for --attention-offload-policy static")
        if not args.offload_step_margin >= 0:  # NaN too
            raise ValueError("--offload-step-margin must be >= 0")
        for name in ("tpot_slo_ms", "ttft_slo_ms"):
            value = getattr(args, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        return args
