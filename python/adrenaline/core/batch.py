"""One forward pass: which tokens of which requests, flattened without padding, where their logits
go (prompt-logprob positions and the one position each finishing chunk samples from), and what
attention needs to know about them (``AttentionBatch``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adrenaline.core.request import Req


@dataclass
class AttentionBatch:
    """What attention needs to know about the requests of one forward pass, in token order."""

    extend_lens: list[int]  # new tokens of each request in this pass (1 for a decode)
    seq_lens: list[int]  # KV length of each request after this pass
    page_table: list[list[int]]  # pages of each request, covering seq_len
    out_slots: torch.Tensor  # [num_tokens] KV slot of each new token

    @property
    def num_tokens(self) -> int:
        return int(sum(self.extend_lens))

    @property
    def is_decode(self) -> bool:
        return all(e == 1 for e in self.extend_lens)

    def select(self, rows: list[int], token_offset: int) -> AttentionBatch:
        """The sub-batch of requests ``rows`` (contiguous in token order from ``token_offset``)."""
        n = sum(self.extend_lens[r] for r in rows)
        return AttentionBatch(
            [self.extend_lens[r] for r in rows],
            [self.seq_lens[r] for r in rows],
            [self.page_table[r] for r in rows],
            self.out_slots[token_offset : token_offset + n],
        )


@dataclass
class ScheduledReq:
    req: Req
    start: int  # position of the first token computed in this pass
    extend: int  # tokens computed in this pass
    prompt_rows: list[int] = field(default_factory=list)  # positions whose logits score prompt tokens
    sample: bool = False  # the pass ends at the sequence's last token: sample the next one

    @property
    def end(self) -> int:
        return self.start + self.extend


@dataclass
class ForwardBatch:
    items: list[ScheduledReq]
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionBatch
    logits_rows: torch.Tensor  # rows of the flat batch whose logits are computed, in item order
    num_local: int | None = None  # leading items whose attention runs here (None: all)

    @classmethod
    def build(
        cls, items: list[ScheduledReq], page_size: int, device: torch.device, num_local: int | None = None
    ) -> ForwardBatch:
        """``num_local``: how many leading items keep their KV in this pool (None: all); the KV of
        the others lives elsewhere, which places it."""
        local = len(items) if num_local is None else num_local
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        for i, it in enumerate(items):
            r = it.req
            base = len(ids)
            fill = r.fill_ids
            ids.extend(fill[it.start : it.end])
            pos.extend(range(it.start, it.end))
            if i >= local:
                slots.extend([-1] * it.extend)
            else:
                slots.extend(
                    r.pages[p // page_size] * page_size + p % page_size for p in range(it.start, it.end)
                )
            rows.extend(base + p - it.start for p in it.prompt_rows)
            if it.sample:
                rows.append(base + it.extend - 1)
        attn = AttentionBatch(
            extend_lens=[it.extend for it in items],
            seq_lens=[it.end for it in items],
            page_table=[it.req.pages for it in items],
            out_slots=torch.tensor(slots, dtype=torch.long, device=device),
        )
        return cls(
            items=items,
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(pos, dtype=torch.long, device=device),
            attn=attn,
            logits_rows=torch.tensor(rows, dtype=torch.long, device=device),
            num_local=num_local,
        )
