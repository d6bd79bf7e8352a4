"""Local room: the decode scheduler tells its placement whether an arriving request would be
admitted here now (``LocalLoad.fits``), and the simulator's decode instance, fed the same arrivals
and the same offload choices, gives its policy the same answers and admits the same requests."""

from __future__ import annotations

import random

import pytest

from adrenaline import Engine
from adrenaline.core.request import Req
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.scheduler.hooks import SchedulerHooks
from adrenaline.scheduler.placement import LocalLoad, Placement
from adrenaline.sim.decode import DecodeInstance
from adrenaline.sim.engine import EventLoop
from adrenaline.sim.instance import Env
from adrenaline.sim.policy import Never
from adrenaline.sim.prefill import Executor
from adrenaline.sim.request import SimReq
from adrenaline.sim.workload import Spec

PAGE, POOL, CAP = 4, 256, 24


class Arriving(SchedulerHooks):
    """PD decode: every waiting request's prompt KV is computed elsewhere."""

    def prefilled_elsewhere(self, req: Req) -> bool:
        return True


class Recorded(Placement):
    """Offloads the requests named, keeps the others here; records what each admission was told."""

    def __init__(self, offload: set[str]) -> None:
        self.offload, self.told = offload, []

    def place(self, req: Req, load: LocalLoad) -> bool:
        self.told.append((req.rid, load.fits))
        return req.rid in self.offload

    def is_local(self, req: Req) -> bool:
        return req.rid not in self.offload


class SameChoices(Never):
    def __init__(self, offload: set[str]) -> None:
        self.offload, self.told = offload, []

    def choose(self, dec, req, fits):
        self.told.append((str(req.rid), fits))
        return str(req.rid) in self.offload


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    path = tiny_model_factory("llama")
    return Engine(path, dtype="float32", max_total_tokens=POOL, page_size=PAGE, max_running_requests=CAP,
                  skip_tokenizer_init=True)  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_the_simulator_admits_as_the_runtime_and_tells_its_policy_the_same(engine, seed):
    rng = random.Random(seed)
    lengths = [(rng.randrange(1, 60), rng.randrange(1, 120)) for _ in range(40)]
    # the first offloaded: the headroom of what runs elsewhere never counts here
    offload = {"0"} | {str(i) for i in range(len(lengths)) if rng.random() < 0.3}
    sched = engine.scheduler
    assert not sched.has_work and sched.allocator.num_available == POOL // PAGE
    sched.placement = Recorded(offload)
    sched.hooks = Arriving()
    for i, (prompt, max_new) in enumerate(lengths):
        sched.add_request(Req(str(i), [1] * prompt, SamplingParams(max_new_tokens=max_new)))
    sched.schedule()
    admitted = [r.rid for r in sched.arriving]

    env = Env(EventLoop(), None, PAGE, 1 << 20, sched.max_seq_len)
    chooser = SameChoices(offload)
    executor = Executor(1 << 20, PAGE, 0.3)
    dec = DecodeInstance(0, env, POOL, CAP, chooser, [executor], lambda r: None, lambda r: None)
    for i, (prompt, max_new) in enumerate(lengths):
        req = SimReq(i, Spec(None, prompt, max_new, max_new), 0.0, sched.max_seq_len)
        req.prefill = req.decode = 0
        dec.pending.append(req)
    dec.admit()
    assert [str(r.rid) for r in dec.inflight.values()] == admitted
    assert chooser.told == sched.placement.told
    told = dict(sched.placement.told)
    assert any(told.values()) and not all(told.values())  # both answers were exercised
    sched.abort()  # leave the shared engine as found
