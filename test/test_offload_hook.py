"""The attention interface's offload hook: part of a batch computed by a RemoteAttention that holds
those requests' KV in its own pool gives the same tokens as all-local, and their KV never lands in
the local pool."""

from __future__ import annotations

import torch
from conftest import random_prompts

from adrenaline import Engine
from adrenaline.attention.base import AttentionBackend, AttentionBatch, RemoteAttention
from adrenaline.attention.torch_backend import TorchAttentionBackend
from adrenaline.kv_cache.pool import KVPool


class InProcessRemote(RemoteAttention):
    """A stand-in executor: a second backend over its own KV pool."""

    def __init__(self, backend: AttentionBackend) -> None:
        self.backend = backend
        self.layers_seen = 0

    def begin(self, batch: AttentionBatch) -> None:
        self.backend.plan(batch)

    def submit(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.out = self.backend.forward(layer, q, k, v)
        self.layers_seen += 1

    def wait(self, layer: int) -> torch.Tensor:
        return self.out


def test_remote_group_matches_local(tiny_model_factory):
    path = tiny_model_factory("mistral")
    prompts = random_prompts(6, 512, [11, 25, 40], seed=7)
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    want = Engine(
        path, dtype="float32", max_total_tokens=2048, page_size=4, skip_tokenizer_init=True
    ).generate(input_ids=prompts, sampling_params=params)

    e = Engine(path, dtype="float32", max_total_tokens=2048, page_size=4, skip_tokenizer_init=True)
    mc = e.runner.model_config
    remote_pool = KVPool(mc, e.runner.pool.num_pages, 4, torch.float32, "cpu")
    remote = InProcessRemote(TorchAttentionBackend(remote_pool, mc.num_heads, mc.num_kv_heads, mc.head_dim))
    offloaded = {f"offline-{i}" for i in range(1, 6, 2)}  # every other request
    schedule, forward = e.scheduler.schedule, e.runner.forward

    def local_first():
        items = schedule()
        items.sort(key=lambda it: it.req.rid in offloaded)
        return items

    def split_forward(batch, _remote=None):
        batch.num_local = sum(it.req.rid not in offloaded for it in batch.items)
        return forward(batch, remote)

    e.scheduler.schedule, e.runner.forward = local_first, split_forward
    got = e.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert remote.layers_seen > 0
    # KV of offloaded requests exists only remotely; local requests' KV only locally.
    local_k = e.runner.pool.k[0].flatten(0, 1).abs().sum(dim=(1, 2))
    remote_k = remote_pool.k[0].flatten(0, 1).abs().sum(dim=(1, 2))
    assert not bool(((local_k > 0) & (remote_k > 0)).any())
    assert bool((remote_k > 0).any()) and bool((local_k > 0).any())
