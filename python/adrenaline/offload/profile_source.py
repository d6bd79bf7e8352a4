"""Which offload profile a decode instance prices with: the given file, else the cached one for
this model, dtype and machine, else a conservative built-in one (named in a log line).

The cache is ``$ADRENALINE_CACHE/profiles/<model>-<dtype>-<machine key>.json``
(``~/.cache/adrenaline`` by default); ``python -m adrenaline.profile`` writes it. The machine key
hashes what the curves depend on: the CPU model, the usable cores and the accelerator, if any.

Why not profile at first start: measuring takes up to ~2 minutes of every core, with an executor
process and an interfering load, on an instance that should be serving, and its numbers would be
disturbed by the rest of a starting cluster. The fallback instead prices the executor exactly as
fast as the local side and the exchange as a fixed per-layer cost, so the policy offloads only
while that cost keeps the predicted step within the step budget (a KV-bound instance with a large
local batch), and the live correction from measured exchange waits takes over from there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

from adrenaline.core.profile import Curve, Grid, Profile, load_profile
from adrenaline.models.default_model import cache_root

logger = logging.getLogger(__name__)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device_name: str = "cpu") -> str:
    """Readable description, e.g. ``Intel(R) Xeon(R) ... x2`` (x usable cores), plus the accelerator."""
    desc = f"{cpu_model()} x{len(os.sched_getaffinity(0))}"
    return desc if device_name == "cpu" else f"{desc} + {device_name}"


def default_profile_path(model_path: str, dtype: str, device_name: str = "cpu") -> Path:
    key = hashlib.sha1(machine(device_name).encode()).hexdigest()[:10]
    name = Path(model_path.rstrip("/")).name or "model"
    return cache_root() / "profiles" / f"{name}-{dtype}-{key}.json"


def fallback_profile(num_layers: int) -> Profile:
    """Conservative curves (a 135M-class model on a few CPU cores): executor as fast as local."""
    attention = Grid([1, 64], [256, 16384], [[0.02, 0.6], [0.1, 0.8]])
    return Profile(
        model="built-in fallback",
        dtype="any",
        device="any",
        machine="any",
        num_layers=num_layers,
        executor_threads=1,
        prefill_threads=1,
        decode_dense=Curve([1, 128], [20.0, 200.0]),
        local_attention=attention,
        executor_attention=attention,
        executor_threads_scaling=Curve([1], [1.0]),
        exchange=Curve([1, 64], [0.2, 0.6]),
        prefill_interference=Curve([0], [1.0]),
    )


def resolve_profile(
    path: str | None, model_path: str, dtype: str, num_layers: int, device_name: str = "cpu"
) -> Profile:
    """``path``, else the cached profile, else ``fallback_profile`` (said in the log)."""
    target = Path(path) if path else default_profile_path(model_path, dtype, device_name)
    if path or target.exists():
        logger.info("load-aware offloading priced by the profile %s", target)
        return load_profile(target)
    logger.warning(
        "no offload profile at %s: load-aware offloading uses the conservative built-in fallback "
        "(run `python -m adrenaline.profile` to measure this machine)",
        target,
    )
    return fallback_profile(num_layers)
