"""Soak: PD + attention offloading under mixed load with aborts, watched for leaks.

    python -m adrenaline.bench.soak --duration 600 -- --dtype bfloat16

Starts a 1P1D pair (prefill with its attention executor on the first half of the cores, decode
on the rest, SGLang's router in front) and drives it for ``--duration`` seconds from
``--clients`` threads: prompts of 8-512 tokens, outputs of 8-256, half of them streamed, and of
those a share cut off mid-stream (the client disconnects, which aborts the request on both
sides). Every ``--sample-every`` seconds it records the decode and prefill KV pages in use, the
executor's pages, and the RSS and open file descriptors of every server process. At the end it
waits for the deployment to go idle and checks that KV, executor pages, RSS and fds are back to
their baseline (taken after a warm-up). Prints throughput, errors, the longest gap between two
chunks of any stream, the samples, and PASS or FAIL per check; exits 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import psutil

from adrenaline.bench.pd import internal_state, pd_pair
from adrenaline.bench.serving import parse_args

RSS_SLACK = 1.15  # RSS may settle this much above its warm baseline (allocator caches)
FD_SLACK = 8


def server_tree(port: int) -> list[psutil.Process]:
    """The process listening on ``port`` and all its descendants (scheduler, executor, ...)."""
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            root = psutil.Process(conn.pid)
            return [root, *root.children(recursive=True)]
    return []


def footprint(ports: list[int]) -> tuple[float, int]:
    """(RSS in MiB, open fds) summed over the servers on ``ports``."""
    rss, fds = 0, 0
    for port in ports:
        for p in server_tree(port):
            try:
                rss += p.memory_info().rss
                fds += p.num_fds()
            except psutil.NoSuchProcess:
                pass
    return rss / 2**20, fds


def pages(decode: int, prefill: int) -> dict:
    d, p = internal_state(decode), internal_state(prefill)
    ex = p.get("disaggregation", {}).get("executor", {})
    return {
        "decode_pages": d["kv_cache"]["num_used_pages"],
        "prefill_pages": p["kv_cache"]["num_used_pages"],
        "executor_pages": ex.get("used_pages", 0),
        "running": d["num_running_reqs"] + d["num_waiting_reqs"],
    }


@dataclass
class Tally:
    done: int = 0
    aborted: int = 0
    errors: list[str] = field(default_factory=list)
    tokens: int = 0
    max_gap_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(url: str, rng: random.Random, abort_share: float, tally: Tally) -> None:
    ids = [rng.randrange(100, 40000) for _ in range(rng.randint(8, 512))]
    stream = rng.random() < 0.5
    cut = stream and rng.random() < abort_share
    body = {"input_ids": ids, "stream": stream,
            "sampling_params": {"max_new_tokens": rng.randint(8, 256), "ignore_eos": True}}  # fmt: skip
    req = urllib.request.Request(
        url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            if not stream:
                out = json.loads(r.read())
                with tally.lock:
                    tally.done += 1
                    tally.tokens += out["meta_info"]["completion_tokens"]
                return
            last, n, tokens, stop_after = time.monotonic(), 0, 0, rng.randint(1, 20)
            for line in r:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                tokens = json.loads(line[5:])["meta_info"]["completion_tokens"]
                now = time.monotonic()
                n += 1
                with tally.lock:
                    tally.max_gap_s = max(tally.max_gap_s, now - last) if n > 1 else tally.max_gap_s
                last = now
                if cut and n >= stop_after:
                    break  # leaving the block closes the connection: the server aborts the request
            with tally.lock:
                tally.aborted += cut
                tally.done += not cut
                tally.tokens += tokens
    except urllib.error.HTTPError as e:  # the body says which side failed and why (router or instance)
        with tally.lock:
            tally.errors.append(f"HTTP {e.code} at {time.strftime('%H:%M:%S')}: {e.read()[:300]!r}")
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        with tally.lock:
            tally.errors.append(f"{type(e).__name__} at {time.strftime('%H:%M:%S')}: {e}")


def drive(url: str, clients: int, until: float, abort_share: float, tally: Tally) -> None:
    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:
            one_request(url, rng, abort_share, tally)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_idle(decode: int, prefill: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = pages(decode, prefill)
        if not any(st.values()) or time.monotonic() > deadline:
            return st
        time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load")
    ap.add_argument("--clients", type=int, default=12, help="concurrent client threads")
    ap.add_argument("--abort-share", type=float, default=0.3, help="share of streams cut mid-stream")
    ap.add_argument("--ratio", default="1", help="--attention-offload-ratio of the decode instance")
    ap.add_argument("--sample-every", type=float, default=30)
    ap.add_argument("--log-dir", default=None)
    args, extra = parse_args(ap)
    prefill_extra = ("--enable-attention-offload",)
    decode_extra = ("--attention-offload-ratio", args.ratio)
    with pd_pair(extra, args.log_dir, prefill_extra, decode_extra) as (router, decode, prefill):
        url = f"http://127.0.0.1:{router}"
        drive(url, 2, time.monotonic() + 20, 0.0, Tally())  # warm-up: caches and allocators settle
        wait_idle(decode, prefill)
        base_rss, base_fds = footprint([decode, prefill, router])
        print(f"[soak] baseline: RSS {base_rss:.0f} MiB, {base_fds} fds", flush=True)
        tally, start = Tally(), time.monotonic()
        load = threading.Thread(
            target=drive, args=(url, args.clients, start + args.duration, args.abort_share, tally)
        )
        load.start()
        print("| t (s) | decode pages | prefill pages | executor pages | RSS (MiB) | fds | done | errors |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        while load.is_alive():
            load.join(args.sample_every)
            try:
                st, (rss, fds) = pages(decode, prefill), footprint([decode, prefill, router])
            except OSError as e:  # a busy instance may not answer /server_info in time: no sample
                print(f"| {time.monotonic() - start:.0f} | no sample: {e} |", flush=True)
                continue
            print(f"| {time.monotonic() - start:.0f} | {st['decode_pages']} | {st['prefill_pages']} | "
                  f"{st['executor_pages']} | {rss:.0f} | {fds} | {tally.done} | {len(tally.errors)} |",
                  flush=True)  # fmt: skip
        elapsed = time.monotonic() - start
        idle = wait_idle(decode, prefill)
        rss, fds = footprint([decode, prefill, router])
    checks = {
        "no errors": not tally.errors,
        "KV and executor pages back to 0": not any(idle.values()),
        f"RSS back within {RSS_SLACK:.2f}x of baseline ({rss:.0f} vs {base_rss:.0f} MiB)":
            rss <= base_rss * RSS_SLACK,
        f"fds back to baseline ({fds} vs {base_fds}, slack {FD_SLACK})": fds <= base_fds + FD_SLACK,
    }  # fmt: skip
    print(f"\n[soak] {elapsed:.0f} s, {args.clients} clients: {tally.done} finished, {tally.aborted} cut "
          f"mid-stream, {len(tally.errors)} errors; {tally.tokens / elapsed:.1f} output tok/s; "
          f"longest gap between chunks {tally.max_gap_s:.2f} s")  # fmt: skip
    for err in tally.errors[:10]:
        print(f"[soak] error: {err}")
    for name, ok in checks.items():
        print(f"[soak] {'PASS' if ok else 'FAIL'}: {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
