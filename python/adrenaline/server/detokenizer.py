"""SGLang's detokenizer process, made to die with its server even when the server dies first.

SGLang's ``run_detokenizer_process`` arms the parent-death signal only after its imports; a server
killed during those seconds (a launcher or test torn down while starting) leaves it orphaned,
spinning. ``die_with_parent`` closes that window: it exits at once when the parent is gone.
"""

from __future__ import annotations

from typing import Any

from adrenaline.procs import die_with_parent


def run_detokenizer_process(*args: Any, **kwargs: Any) -> None:
    die_with_parent()
    from sglang.srt.managers.detokenizer_manager import run_detokenizer_process as run

    run(*args, **kwargs)
