"""Message kinds between decode instances, prefill schedulers and attention executors."""

from __future__ import annotations

# decode -> executor: once per step (rooms, lengths, frees), then packed q|k|v per layer
ATTN_STEP, ATTN_QKV, ATTN_FREE = "attn_step", "attn_qkv", "attn_free"
# executor -> decode: the layer's attention output, or why the step cannot be served
ATTN_OUT, ATTN_ERROR = "attn_out", "attn_error"
# prefill scheduler -> executor: pages for a prompt's KV, frees, statistics (each answered)
EXEC_ALLOC, EXEC_FREE, EXEC_STATS, EXEC_REPLY = "exec_alloc", "exec_free", "exec_stats", "exec_reply"
