"""What a run produced: throughput, latency percentiles, batch and KV usage, resource use."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from adrenaline.sim.cluster import Cluster


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted copy."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Summary:
    requests: int
    rejected: int  # prompts too long for the model or the decode KV pool
    finished: int
    duration_s: float
    output_tok_s: float
    request_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    mean_decode_batch: float  # per decode instance, per forward pass (the runtime's stat)
    mean_offloaded: float  # offloaded share of the decode batch, over samples
    decode_kv_use: float  # mean share of decode KV pools in use
    executor_kv_use: float
    prefill_hbm_capacity_use: float  # weights + KV in use on prefill GPUs, share of HBM
    prefill_hbm_bw_use: float  # bytes moved / (time x peak bandwidth) on prefill GPUs
    remote_exposed: float  # share of decode time the remote attention + exchange was not hidden
    retractions: int
    fallbacks: int

    def as_dict(self) -> dict:
        return asdict(self)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def summarize(cluster: Cluster) -> Summary:
    reqs = cluster.requests
    done = [r for r in reqs if r.finished is not None]
    t0 = min((r.arrival for r in reqs), default=0.0)
    end = max((r.finished for r in done), default=t0)
    dur = max(end - t0, 1e-9)
    ttft = [(r.first_token - r.arrival) * 1e3 for r in done]
    tpot = [(r.finished - r.first_token) * 1e3 / (r.generated - 1) for r in done if r.generated > 1]
    decs = cluster.decodes
    steps = sum(d.steps for d in decs)
    samples = [s for s in cluster.samples if s.time <= end]
    batch = [sum(a + b for a, b in s.decode_batch) for s in samples]
    off = [sum(b for _, b in s.decode_batch) for s in samples]
    dec_cap = sum(d.num_pages * d.page_size for d in decs)
    exes = [e for e in cluster.executors if e is not None]
    ex_cap = sum(e.num_pages * e.page_size for e in exes)
    cost = cluster.cost
    weights = cost.model.weight_bytes * len(cluster.prefills)
    kv_b = cost.model.kv_bytes_per_token
    p_kv = [(sum(s.prefill_kv) + sum(s.executor_kv)) * kv_b for s in samples]
    p_hbm = getattr(cost, "hbm_bytes", float("nan")) * len(cluster.prefills)
    moved = sum(p.bytes_moved for p in cluster.prefills) + sum(e.bytes_read for e in exes)
    p_bw = getattr(cost, "hbm_bw", float("nan")) * len(cluster.prefills)
    return Summary(
        requests=len(reqs),
        rejected=len(cluster.rejected),
        finished=len(done),
        duration_s=dur,
        output_tok_s=sum(r.generated for r in done) / dur,
        request_s=len(done) / dur,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50),
        tpot_p99_ms=percentile(tpot, 99),
        mean_decode_batch=sum(d.batched for d in decs) / max(steps, 1),
        mean_offloaded=_mean(off) / max(_mean(batch), 1e-9),
        decode_kv_use=_mean([sum(s.decode_kv) / dec_cap for s in samples]),
        executor_kv_use=_mean([sum(s.executor_kv) / ex_cap for s in samples]) if ex_cap else 0.0,
        prefill_hbm_capacity_use=(weights + _mean(p_kv)) / p_hbm,
        prefill_hbm_bw_use=moved / (dur * p_bw),
        remote_exposed=sum(d.exposed_remote for d in decs) / max(sum(d.busy_time for d in decs), 1e-9),
        retractions=sum(d.retractions for d in decs),
        fallbacks=sum(d.fallbacks for d in decs),
    )
