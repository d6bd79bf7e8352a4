"""The simulator's event loop: time order, FIFO ties, no events in the past, partial runs."""

from __future__ import annotations

import pytest

from adrenaline.sim.engine import EventLoop


def test_events_run_in_time_order_and_ties_in_schedule_order():
    loop, seen = EventLoop(), []
    for t, name in [(3.0, "c"), (1.0, "a"), (2.0, "b1"), (2.0, "b2"), (0.0, "z")]:
        loop.at(t, lambda t=t, name=name: seen.append((loop.now, name)))
    loop.run()
    assert seen == [(0.0, "z"), (1.0, "a"), (2.0, "b1"), (2.0, "b2"), (3.0, "c")]
    assert loop.events == 5 and loop.pending == 0


def test_events_scheduled_by_events_and_after_is_relative():
    loop, seen = EventLoop(), []

    def tick(n: int) -> None:
        seen.append(loop.now)
        if n:
            loop.after(0.5, lambda: tick(n - 1))

    loop.at(1.0, lambda: tick(3))
    loop.run()
    assert seen == [1.0, 1.5, 2.0, 2.5]


def test_the_past_cannot_be_scheduled():
    loop = EventLoop()
    loop.at(2.0, lambda: None)
    loop.run()
    with pytest.raises(ValueError):
        loop.at(1.0, lambda: None)


def test_run_until_leaves_later_events_queued():
    loop, seen = EventLoop(), []
    for t in (1.0, 2.0, 3.0):
        loop.at(t, lambda t=t: seen.append(t))
    loop.run(until=2.0)
    assert seen == [1.0, 2.0] and loop.pending == 1
    loop.run()
    assert seen == [1.0, 2.0, 3.0]
