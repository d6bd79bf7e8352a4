"""The offload sweep's workloads and static ratios (issue 13), as data for ``bench.offload --sweep``.

- (a) ``kv-bound``: today's headline. Short prompts, long outputs, many at once, and a decode KV
  pool that bounds the decode batch: offloading grows the batch.
- (b) ``ample-kv``: the same stream with decode KV to spare; the decode step is bound by its
  dense work and offloading has little to give (a good policy offloads little and loses nothing).
- (c) ``bursty``: the KV-bound stream plus bursts of long prompts; while a burst's prefills queue
  the executor's prefill instance must not also carry more attention (prefill protection).

A workload is one or more client streams run together, each one ``sglang.benchmark.serving`` run
(``bench.serving.run_client``) started ``start_s`` after the first; a burst is a stream whose
concurrency is its size.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Stream:
    num_prompts: int
    input_len: int
    output_len: int
    max_concurrency: int
    start_s: float = 0.0

    def client_args(self) -> argparse.Namespace:
        """The namespace ``run_client`` reads."""
        return argparse.Namespace(
            num_prompts=self.num_prompts,
            input_len=self.input_len,
            output_len=self.output_len,
            max_concurrency=self.max_concurrency,
        )


@dataclass(frozen=True)
class Workload:
    name: str
    streams: tuple[Stream, ...]
    decode_max_total_tokens: int  # the decode instance's KV pool, in tokens

    @property
    def output_tokens(self) -> int:
        return sum(s.num_prompts * s.output_len for s in self.streams)


# Sized for a sweep of ~15 minutes on two cores (~15-30 s a run); ``--scale 3`` gives the headline's
# 48 requests at once.
STEADY = Stream(num_prompts=16, input_len=32, output_len=256, max_concurrency=16)
# bursts of prompts half the decode pool long (a longer one could never be decoded there: refused)
BURSTS = tuple(Stream(2, 512, 16, 2, start_s=t) for t in (3.0, 8.0, 13.0))

WORKLOADS = {
    "kv-bound": Workload("kv-bound", (STEADY,), decode_max_total_tokens=1024),
    "ample-kv": Workload("ample-kv", (STEADY,), decode_max_total_tokens=65536),
    "bursty": Workload("bursty", (STEADY, *BURSTS), decode_max_total_tokens=1024),
}

# the static ratios the sweep compares with the load-aware policy ("inf": offload all)
STATIC_RATIOS = ("0", "1", "2", "4", "8", "inf")
