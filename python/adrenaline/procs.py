"""Child processes for launchers, benchmarks and tests: a free port, and ``spawn``.

``spawn`` puts the child in a session of its own (so ``os.killpg`` ends it with everything it
started) and has the kernel kill it when its parent dies: a launcher, benchmark or test runner
that is killed outright must not leave servers behind that hold ports and burn the CPU for
whatever runs next. SGLang's own processes (scheduler, detokenizer) and our attention executor
likewise die with their parent, so the whole tree goes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (thread) ends. In a multiprocessing
    child, whose parent may have died before this call (it spends seconds importing first; the
    signal then never comes), exit at once. Done here rather than through SGLang's helper of the
    same job: importing that costs a launcher ~6 s, and it has no such check."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def spawn(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen in a new session, SIGKILLed when the spawning thread ends (call it from the main one)."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent, **popen_kwargs)
