"""Adrenaline: PD-disaggregated LLM serving that offloads decode attention to prefill instances."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from adrenaline.engine import Engine


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for the server's scheduler process) must not load torch twice.
    if name == "Engine":
        from adrenaline.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine"]
