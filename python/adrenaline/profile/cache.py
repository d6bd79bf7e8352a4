"""Where a profile is cached: one file per model, dtype and machine, so a server finds its own.

``$ADRENALINE_CACHE/profiles/<model>-<dtype>-<machine key>.json`` (``~/.cache/adrenaline`` by
default). The machine key hashes what the curves depend on: the CPU model, the usable cores and
the accelerator, if any.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from adrenaline.models.default_model import cache_root


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
