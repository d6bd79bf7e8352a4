"""Attention offloading: the decode side hands the attention of some requests, whose KV stays on
the prefill side, to an attention executor there (``executor.py``), exchanging packed q/k/v and
outputs once per layer (``client.py``); which requests go is a pluggable policy (``policy.py``)."""
