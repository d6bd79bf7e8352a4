"""Server-side request checks on SGLang fields our ``Req`` does not carry, and client-safe messages.

``n`` never reaches a ``Req``: SGLang's TokenizerManager fans a request with ``n > 1`` out into a
prefix-caching request (``max_new_tokens=0``) and ``n`` copies, each carrying ``sampling_params.n``.
Rejecting the first one fails the whole request with HTTP 400 before any copy is sent.
"""

from __future__ import annotations

import re
from typing import Any

# Native-library log prefixes, e.g. xgrammar's "[18:00:27] /project/cpp/regex_converter.cc:83: ".
_LOG_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")
_CHECK_FAILED = re.compile(r"Check failed: \(.*?\) is (?:false|true): ")
# Absolute paths of two or more components (not the tail of a relative path or of a URL host).
_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+-]+){2,}/?")


def client_message(text: str) -> str:
    """``text`` without server file paths or native-library log noise: what a client may see."""
    text = _CHECK_FAILED.sub("", _LOG_PREFIX.sub("", text))
    return _PATH.sub("<path>", text).strip()


def check_parallel_samples(msg: Any, limit: int) -> None:
    """ValueError (HTTP 400) unless ``1 <= n <= limit`` (``--max-parallel-samples``)."""
    n = getattr(msg.sampling_params, "n", 1)
    n = 1 if n is None else n
    if not 1 <= n <= limit:
        raise ValueError(f"n must be in [1, {limit}] (--max-parallel-samples), got {n}")
