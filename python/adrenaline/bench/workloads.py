"""The offload sweep's workloads and policies (issue 13), as data for ``bench.offload --sweep``.

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


STEADY = Stream(num_prompts=48, input_len=32, output_len=256, max_concurrency=48)
BURSTS = tuple(Stream(4, 1024, 16, 4, start_s=t) for t in (5.0, 15.0, 25.0))

WORKLOADS = {
    "kv-bound": Workload("kv-bound", (STEADY,), decode_max_total_tokens=1024),
    "ample-kv": Workload("ample-kv", (STEADY,), decode_max_total_tokens=65536),
    "bursty": Workload("bursty", (STEADY, *BURSTS), decode_max_total_tokens=1024),
}

# decode-side flags of each policy the sweep compares (plain PD runs without an executor)
STATIC_RATIOS = ("0", "1", "2", "4", "8", "inf")
POLICIES: dict[str, tuple[str, ...]] = {
    **{
        f"static {r}": ("--attention-offload-policy", "static", "--attention-offload-ratio", r)
        for r in STATIC_RATIOS
    },
    "load-aware": ("--attention-offload-policy", "load-aware"),
}

# what the sweep reports per (workload, policy), as sglang.benchmark.serving names it
METRICS = ("output_throughput", "median_tpot_ms", "p99_tpot_ms", "max_itl_ms", "p99_ttft_ms")
