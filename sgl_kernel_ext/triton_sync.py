"""Flag kernels that order two CUDA graphs on one GPU (the offload exchange, ``runner/ipc_exchange.py``).

A flag holds ``step * num_layers + layer + 1`` of the last layer signalled. ``signal`` raises it
with an atomic max (release, system scope: the peer may be another process mapping the memory
over CUDA IPC); ``wait`` spins (acquire) until it reaches the target. ``step`` is a device tensor,
so a captured graph waits for a new target on every replay; a step of -1 makes every wait pass
and every signal a no-op, which is how graphs are warmed up without a peer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _signal(Flags, Step, index, layer, num_layers):
    target = tl.load(Step) * num_layers + layer + 1
    tl.atomic_max(Flags + index, target, sem="release", scope="sys")


@triton.jit
def _wait(Flags, Step, index, layer, num_layers):
    target = tl.load(Step) * num_layers + layer + 1
    seen = tl.atomic_add(Flags + index, 0, sem="acquire", scope="sys")
    while seen < target:
        seen = tl.atomic_add(Flags + index, 0, sem="acquire", scope="sys")


def signal(flags: torch.Tensor, step: torch.Tensor, index: int, layer: int, num_layers: int) -> None:
    _signal[(1,)](flags, step, index, layer, num_layers)


def wait(flags: torch.Tensor, step: torch.Tensor, index: int, layer: int, num_layers: int) -> None:
    _wait[(1,)](flags, step, index, layer, num_layers)
