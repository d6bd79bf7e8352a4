"""The package's layers, as docs/architecture.md draws them: every import points down, the core
types import nothing of ours, and the scheduler never knows about offloading."""

from __future__ import annotations

import ast
from pathlib import Path

import adrenaline

PKG = Path(adrenaline.__file__).parent

# Higher imports lower, never the reverse (imports under ``if TYPE_CHECKING`` are annotations only).
RANK = {
    "core": 0, "config": 0, "model_config": 0, "procs": 0,
    "kv_cache": 1,
    "attention": 2, "models": 2, "sampling": 2, "transport": 2,
    "runner": 3,
    "scheduler": 4,
    "offload": 5,
    "disaggregation": 6,
    "engine": 7, "server": 7,
    "__init__": 8, "launch_server": 8, "launch_pd": 8,
    "bench": 9, "colocated": 9,
    "profile": 10, "sim": 10,  # the profiler times a served stream with the benchmarks' client
}  # fmt: skip
TOOLS = 10  # a package not ranked here yet sits at the top: nothing may import it


def rank(name: str) -> int:
    return RANK.get(name, TOOLS)


def layer(path: Path) -> str:
    return path.relative_to(PKG).parts[0].removesuffix(".py")


def imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    annotation_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and getattr(branch.test, "id", None) == "TYPE_CHECKING"
        for node in ast.walk(branch)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in annotation_only:
            continue
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        out |= {n.split(".")[1] for n in names if n.startswith("adrenaline.")}
    return out - {layer(path)}


def test_every_import_points_down():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 50
    upward = [
        f"{f.relative_to(PKG)} -> {dep}"
        for f in files
        for dep in imported_layers(f)
        if rank(dep) >= rank(layer(f))
    ]
    assert upward == []


def test_core_imports_nothing_above_it():
    assert all(imported_layers(f) <= {"core"} for f in (PKG / "core").glob("*.py"))


def test_scheduler_never_mentions_offloading():
    """Where attention runs is the Placement's business (scheduler/placement.py)."""
    assert [f.name for f in (PKG / "scheduler").glob("*.py") if "offload" in f.read_text().lower()] == []
