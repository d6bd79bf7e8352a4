"""The CPU colocation share on a synthetic 8-core profile: executor attention scales as 1/threads
(8 ms at one thread), prefill loses 100 tokens/s of 1000 per core the executor holds."""

from __future__ import annotations

import os
import subprocess

import pytest

from adrenaline.core.profile import Curve, Grid, Profile
from adrenaline.offload.colocation import CoreSplit, choose_executor_threads, split_cores


@pytest.fixture
def profile() -> Profile:
    flat = Grid([1, 64], [64, 65536], [[8.0, 8.0], [8.0, 8.0]])
    return Profile(
        model="synthetic", dtype="float32", device="cpu", machine="test", num_layers=4,
        executor_threads=1, prefill_threads=7,
        decode_dense=Curve([1, 64], [1, 2]), local_attention=flat, executor_attention=flat,
        executor_threads_scaling=Curve(list(range(1, 9)), [8 / t for t in range(1, 9)]),
        exchange=Curve([1, 64], [0.0, 0.0]),
        prefill_interference=Curve(list(range(8)), [1000 - 100 * x for x in range(8)]),
    )  # fmt: skip


@pytest.mark.parametrize(
    "budget_ms, min_prefill, expected",
    [
        (8.0, 0, 1),  # one core computes it in time
        (2.0, 0, 4),  # the smallest share that does: 8 / 4 = 2 ms
        (1.99, 0, 5),
        (2.0, 600, 4),  # the prefill keeps 600 tokens/s at 4 cores held
        (2.0, 700, 3),  # ... not at 4: the prefill's floor wins, the executor gets what it allows
        (0.1, 0, 7),  # never enough: all but the prefill's one core
        (0.1, 5000, 1),  # no share meets the prefill's floor: the smallest
    ],
)
def test_smallest_share_meeting_the_budget_within_the_prefill_floor(
    profile, budget_ms, min_prefill, expected
):
    assert choose_executor_threads(profile, 8, 16, 4096, budget_ms, min_prefill) == expected


def test_one_core_is_shared(profile):
    assert choose_executor_threads(profile, 1, 16, 4096, 0.1) == 1
    assert split_cores([3], 1) == CoreSplit([3], [3])


def test_split_gives_the_executor_the_last_cores_and_the_prefill_at_least_one():
    assert split_cores([4, 5, 6, 7, 0, 1, 2, 3], 3) == CoreSplit([5, 6, 7], [0, 1, 2, 3, 4])
    assert split_cores([0, 1], 5) == CoreSplit([1], [0])


def test_apply_pins_both_processes():
    cores = sorted(os.sched_getaffinity(0))
    split = split_cores(cores, 1)
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        split.apply(procs[0].pid, procs[1].pid)
        assert os.sched_getaffinity(procs[0].pid) == set(split.executor)
        assert os.sched_getaffinity(procs[1].pid) == set(split.prefill)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_executor_cores_flag_splits_this_machines_cores(profile, tmp_path):
    """``--executor-cores`` on a prefill instance: a count as given; ``auto``: the fewest cores that
    compute the pool's attention (8 ms / threads) within the local attention (2 ms here): 4, or all
    but the prefill's one core where the machine has fewer."""
    from dataclasses import replace
    from types import SimpleNamespace

    import torch

    from adrenaline.core.profile import save_profile
    from adrenaline.server.args import AdrenalineArgs
    from adrenaline.server.roles import _core_split

    cores = sorted(os.sched_getaffinity(0))
    cpu = SimpleNamespace(
        device=torch.device("cpu"), dtype=torch.float32, model_config=SimpleNamespace(num_layers=4)
    )
    config = SimpleNamespace(model_path=str(tmp_path), max_running_requests=16)
    pool = SimpleNamespace(num_slots=4096)
    assert _core_split(AdrenalineArgs(), cpu, config, pool) is None  # unset: nothing pinned
    assert _core_split(AdrenalineArgs(executor_cores="1"), cpu, config, pool) == split_cores(cores, 1)
    save_profile(
        replace(profile, local_attention=Grid([1, 64], [64, 65536], [[2.0] * 2] * 2)), tmp_path / "p.json"
    )
    auto = AdrenalineArgs(executor_cores="auto", offload_profile=str(tmp_path / "p.json"))
    assert _core_split(auto, cpu, config, pool) == split_cores(cores, min(4, max(len(cores) - 1, 1)))
    gpu = SimpleNamespace(device=torch.device("meta"))
    assert _core_split(AdrenalineArgs(executor_cores="1"), gpu, config, pool) is None
