"""Executor side of the load-aware policy: the future KV it has promised, per decode instance.

The executor is the one place that sees every decode instance's offloads, so it is the final word
on memory: it admits a request's whole future KV (prompt + max_new_tokens) only within its room
after the prefill's reserve, and only within a fair share of that room per decode instance.
Shares are equal among the instances holding commitments plus the one asking, so an idle
instance does not block the others' use; an instance above its share after a newcomer arrives
keeps what it has (KV cannot be taken back) and is refused until it drops below. ``share`` gives
a decode instance the numbers its ``ExecutorLoad`` needs, from the ledger or from the copy of it
in the executor's statistics (``ExecutorStats``) that its prefill instance forwards.
"""

from __future__ import annotations

from collections import Counter

from adrenaline.offload.load_aware import Reason


def share(capacity: int, reserve: int, committed: dict[str, int], client: str) -> dict[str, int]:
    """What decode instance ``client`` copies into its ``ExecutorLoad`` (besides its load and times)."""
    active = {c for c, t in committed.items() if t > 0} | {client}
    return {
        "capacity_tokens": capacity,
        "reserve_tokens": reserve,
        "committed_tokens": sum(committed.values()),
        "seen_ours_tokens": committed.get(client, 0),
        "clients": len(active),
    }


class ExecutorLedger:
    def __init__(self, capacity_tokens: int, reserve_tokens: int = 0) -> None:
        self.capacity, self.reserve = capacity_tokens, reserve_tokens
        self.room = capacity_tokens - reserve_tokens
        self.by_request: dict[object, tuple[str, int]] = {}  # request key -> (decode instance, tokens)
        self.by_client: Counter[str] = Counter()
        self.counts: Counter[Reason] = Counter()

    @property
    def committed(self) -> int:
        return sum(self.by_client.values())

    def clients(self, asking: str | None = None) -> int:
        active = {c for c, t in self.by_client.items() if t > 0}
        return len(active | ({asking} if asking else set()))

    def admit(self, client: str, request: object, tokens: int) -> Reason:
        """Commit ``tokens`` of future KV for ``request`` of decode instance ``client``, or refuse."""
        if self.committed + tokens > self.room:
            reason = Reason.MEMORY
        elif self.by_client[client] + tokens > self.room / self.clients(client):
            reason = Reason.FAIR_SHARE
        else:
            reason = Reason.OK
            self.by_request[request] = (client, tokens)
            self.by_client[client] += tokens
        self.counts[reason] += 1
        return reason

    def release(self, request: object) -> None:
        client, tokens = self.by_request.pop(request, ("", 0))
        if tokens:
            self.by_client[client] -= tokens

    def report(self, client: str) -> dict[str, int]:
        return share(self.capacity, self.reserve, dict(self.by_client), client)
