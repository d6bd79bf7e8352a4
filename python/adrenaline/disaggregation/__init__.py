"""Prefill/decode disaggregation: the prefill side sends a request's KV pages and first token to
the decode side, which pre-allocated their slots (``prefill.py``, ``decode.py``). Rendezvous goes
through SGLang's own bootstrap server (``bootstrap.py``); bytes go through a ``Transport``."""
