"""What a prefill instance reports to its decode peers: per-interval queue and TTFT samples, and
its executor's ledger as the receiving decode instance shares it."""

from __future__ import annotations

from adrenaline.offload.ledger import ExecutorLedger
from adrenaline.offload.load_report import LoadMeter
from adrenaline.offload.protocol import ExecutorStats, LoadReport


def test_samples_are_the_largest_queue_and_the_mean_ttft_per_interval():
    m = LoadMeter(interval_s=1.0, history=3)
    m._since = 0.0
    for now, queue in [(0.1, 2), (0.5, 5), (0.9, 1)]:
        m.sample(queue, now)
    m.prefilled(0.1)
    m.prefilled(0.3)
    assert list(m.queue) == [] and list(m.ttft_ms) == []  # the interval is not over
    m.sample(3, 1.0)
    assert list(m.queue) == [5] and list(m.ttft_ms) == [200.0]
    for t in range(2, 6):  # no prompt finished: no TTFT sample; only the last 3 intervals kept
        m.sample(t, float(t))
    assert list(m.queue) == [3, 4, 5] and list(m.ttft_ms) == [200.0]


def test_report_gives_the_receiver_its_share_of_the_executor_ledger():
    ledger = ExecutorLedger(capacity_tokens=1000, reserve_tokens=100)
    ledger.admit("d0", 1, 300)
    ledger.admit("d1", 2, 200)
    stats = ExecutorStats(2, 30, 64, 0, [], 1000, 100, {c: t for c, t in ledger.by_client.items()})
    m = LoadMeter()
    m.queue.extend([1, 2])
    report = m.report(stats, "d1", page_size=16)
    expected = dict(ledger.report("d1"), requests=2, context_tokens=480)
    assert report == LoadReport([1, 2], [], **expected)
    assert m.report(stats, "d2", 16).clients == 3  # a newcomer counts itself
    assert m.report(None, "d1", 16) == LoadReport([1, 2], [])  # no executor: nothing to offload to
