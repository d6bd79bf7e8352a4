"""One forward pass: which tokens of which requests, flattened without padding, and where their
logits go (prompt-logprob positions and the one position each finishing chunk samples from)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adrenaline.attention.base import AttentionBatch
from adrenaline.scheduler.request import Req


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
    def build(cls, items: list[ScheduledReq], page_size: int, device: torch.device) -> ForwardBatch:
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        for it in items:
            r = it.req
            base = len(ids)
            fill = r.fill_ids
            ids.extend(fill[it.start : it.end])
            pos.extend(range(it.start, it.end))
            if r.offload is not None:  # its KV lives in an attention executor's pool, which places it
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
        )
