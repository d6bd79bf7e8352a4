"""A decode step's CPU work outside the model forward, vs batch: what the forward curves miss.

The scheduler process runs it in series with the forward, so every decode step pays it: forming
the batch (``Scheduler.schedule``, ``ForwardBatch.build``), sampling, finish checks, and the
step's streamed output (``OutputBatch``: one ``BatchTokenIDOutput`` with every request's new
token) handed to ZeroMQ as the server sends it to its detokenizer. It is timed by driving the
real ``Scheduler`` over a stub runner whose forward returns fixed logits, so only the step's own
work is left; requests are greedy and streamed, as the benchmarks send them.

Not in it: the detokenizer and the HTTP front end, processes of their own (they add to a step
only when they share its cores).
"""

from __future__ import annotations

import torch
import zmq
from sglang.srt.managers import io_struct as io

from adrenaline.config import EngineConfig
from adrenaline.core.request import Req
from adrenaline.core.sampling_params import SamplingParams
from adrenaline.kv_cache.allocator import num_pages
from adrenaline.model_config import ModelConfig
from adrenaline.profile.measure import PAGE, best_ms
from adrenaline.scheduler.scheduler import Scheduler
from adrenaline.server.io_convert import OutputBatch

PROMPT = 32  # tokens per request (the benchmarks' prompts)


class _Pool:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages


class StubRunner:
    """What ``Scheduler`` reads of a ``ModelRunner``; its forward costs nothing (fixed logits)."""

    def __init__(self, mc: ModelConfig, max_batch: int, pages: int) -> None:
        self.model_config, self.page_size, self.device = mc, PAGE, torch.device("cpu")
        self.pool = _Pool(pages)
        self.max_total_tokens = pages * PAGE
        self.logits = torch.randn(max_batch, mc.vocab_size, generator=torch.Generator().manual_seed(0))

    def forward(self, batch, remote=None) -> torch.Tensor:
        return self.logits[: len(batch.logits_rows)]


class OverheadRig:
    def __init__(self, mc: ModelConfig, max_batch: int) -> None:
        self.mc, self.max_batch = mc, max_batch
        self.ctx = zmq.Context(1)
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.pull.bind("inproc://profile-overhead")
        self.push.connect("inproc://profile-overhead")
        self.last = b""  # the latest step's message as sent

    def step_ms(self, batch: int, reps: int, threads: int) -> float:
        """The fastest of ``reps`` decode steps of ``batch`` running requests, output sent."""
        output = reps + 4  # tokens per request: none ends while timed (1 warm-up, ``reps`` timed)
        pages = batch * num_pages(PROMPT + output, PAGE)  # room for all: no admission waits
        runner = StubRunner(self.mc, self.max_batch, pages)
        cfg = EngineConfig(device="cpu", max_total_tokens=pages * PAGE, max_running_requests=batch)
        sched = Scheduler(runner, cfg, tokenizer=None)
        params = SamplingParams(max_new_tokens=output, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            sched.add_request(Req(f"p{i}", list(range(PROMPT)), params, stream=True))
        sched.step()  # the prompts

        def step() -> None:
            out = OutputBatch()
            for req in sched.step():
                out.add(req)
            io.sock_send(self.push, out.build())
            self.last = self.pull.recv()  # drained, so the queue never blocks the next send

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return best_ms(step, reps)
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()
