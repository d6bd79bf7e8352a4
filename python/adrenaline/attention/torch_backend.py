"""Reference attention backend in plain PyTorch (CPU and GPU).

Decode requests go through one ``paged_decode_attention`` call (on CPU a C++ kernel that reads the
pages in place); each prefill chunk gets its own SDPA call with a causal mask offset by its cached
prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adrenaline.attention.base import AttentionBackend
from adrenaline.core.batch import AttentionBatch
from adrenaline.kv_cache.pool import KVPool
from sgl_kernel_ext import cpu
from sgl_kernel_ext.ops import batch_invariant, cpu_has_low_precision_fma, paged_decode_attention


def request_slots(pages: list[int], seq_len: int, page_size: int, device: torch.device) -> torch.Tensor:
    """Flat KV slot of every position 0..seq_len-1 of a request."""
    p = torch.tensor(pages, dtype=torch.long, device=device)
    return (p[:, None] * page_size + torch.arange(page_size, device=device)).flatten()[:seq_len]


class TorchAttentionBackend(AttentionBackend):
    def __init__(self, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(pool, num_heads, num_kv_heads, head_dim)
        self.upcast = (
            pool.device.type == "cpu" and pool.dtype != torch.float32 and not cpu_has_low_precision_fma()
        )
        if pool.device.type == "cpu":
            cpu.kernels()  # build (or load) the decode kernel now, not on the first request

    def plan(self, batch: AttentionBatch) -> None:
        dev = self.pool.device
        ps = self.pool.page_size
        self.out_slots = batch.out_slots
        starts, t = [], 0
        for e in batch.extend_lens:
            starts.append(t)
            t += e
        if batch_invariant():
            return self._plan_rowwise(batch)
        dec = [i for i, e in enumerate(batch.extend_lens) if e == 1]
        self.prefills = []
        for i, e in enumerate(batch.extend_lens):
            if e == 1:
                continue
            slots = request_slots(batch.page_table[i], batch.seq_lens[i], ps, dev)
            prefix = batch.seq_lens[i] - e
            mask = None
            if prefix:
                kv_pos = torch.arange(batch.seq_lens[i], device=dev)
                mask = kv_pos[None, :] <= (prefix + torch.arange(e, device=dev))[:, None]
            self.prefills.append((starts[i], e, slots, mask))
        # decode group: (token rows or None when the batch is all decodes, page matrix, KV lengths)
        self.decode: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None
        if dec:
            lens = [batch.seq_lens[i] for i in dec]
            width = -(-max(lens) // ps)
            idx = torch.zeros(len(dec), width, dtype=torch.long)
            for row, i in enumerate(dec):
                pages = batch.page_table[i][: -(-lens[row] // ps)]
                idx[row, : len(pages)] = torch.tensor(pages)
            rows = None if len(dec) == t else torch.tensor([starts[i] for i in dec], device=dev)
            self.decode = (rows, idx.to(dev), torch.tensor(lens, device=dev))

    def _plan_rowwise(self, batch: AttentionBatch) -> None:
        """Batch-invariant mode: every token, prefill ones too, through the decode kernel as a row of
        its own over KV[0, position]. Its result then depends on its request alone: not on how the
        prompt was chunked, nor on the batch, nor on whether the attention ran here or on an
        executor (which runs the same kernel)."""
        ps = self.pool.page_size
        width = max(-(-n // ps) for n in batch.seq_lens)
        idx = torch.zeros(len(batch.out_slots), width, dtype=torch.long)
        lens, row = [], 0
        for pages, e, n in zip(batch.page_table, batch.extend_lens, batch.seq_lens):
            used = torch.tensor(pages[: -(-n // ps)], dtype=torch.long)
            idx[row : row + e, : len(used)] = used
            lens.extend(range(n - e + 1, n + 1))
            row += e
        self.prefills = []
        dev = self.pool.device
        self.decode = (None, idx.to(dev), torch.tensor(lens, device=dev))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool) -> torch.Tensor:
        """q: [B, H, Tq, D]; k/v: [B, Hkv, Tk, D]. Low precision runs in float32 on CPUs without its FMA."""
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True
        )
        return o.to(dtype)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.pool.write(layer, self.out_slots, k, v)
        kf, vf = self.pool.flat(layer)
        q = q.to(kf.dtype)
        if self.decode is not None and self.decode[0] is None:
            return self._decode(q, layer)
        out = torch.empty_like(q)
        for start, e, slots, mask in self.prefills:
            qs = q[start : start + e].transpose(0, 1)[None]
            ks, vs = kf[slots].transpose(0, 1)[None], vf[slots].transpose(0, 1)[None]
            out[start : start + e] = self._sdpa(qs, ks, vs, mask, mask is None)[0].transpose(0, 1)
        if self.decode is not None:
            rows = self.decode[0]
            out[rows] = self._decode(q[rows], layer)
        return out

    def _decode(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        _, idx, lens = self.decode
        out = paged_decode_attention(q, self.pool.k[layer], self.pool.v[layer], idx, lens, self.scale)
        return out.to(q.dtype)
