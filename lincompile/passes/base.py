"""Passes, their registry and the pass manager.

A pass is a small named object with typed options that transforms a `PassContext` in place. The
manager runs an ordered pipeline, times each pass, checks graph invariants after it, can dump the
graph before/after, stop after a pass, skip disabled passes, and verify numerics pass by pass.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import fx

from lincompile.capture.check import check_graph
from lincompile.capture.export import CapturedGraph
from lincompile.passes.pictures import write_site_pictures


@dataclass
class PassContext:
    """Everything passes share: the graph, what detection found, what linearization added."""

    captured: CapturedGraph
    sites: list = field(default_factory=list)          # AttentionSite records (detect_attention)
    unmatched: list = field(default_factory=list)      # UnmatchedSoftmax records (detect_attention)
    rewritten: list = field(default_factory=list)      # RewrittenSite records (linearize)
    new_parameters: dict[str, torch.nn.Parameter] = field(default_factory=dict)

    @property
    def gm(self) -> fx.GraphModule:
        return self.captured.gm


@dataclass
class PassResult:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "seconds": round(self.seconds, 4), "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "notes": self.notes, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff}


class Pass:
    """Base class: subclasses set `name` and `description` and implement `run`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()  # passes that must run before this one (what it reads from the context)
    not_after: ClassVar[tuple[str, ...]] = ()  # passes that must not run before it (they rewrite what it reads)

    def run(self, ctx: PassContext) -> list[str]:
        """Transform `ctx` in place; return short notes for the report."""
        raise NotImplementedError

    def pictures(self, ctx: PassContext) -> list[tuple[str, list[fx.Node], str]]:
        """(file stem, nodes, title) of subgraphs worth drawing after this pass (for dump_dir)."""
        return []


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register a pass once under its name."""
    if not cls.name or cls.name in _PASSES:
        raise ValueError(f"pass name {cls.name!r} is empty or already registered")
    _PASSES[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_PASSES)


Verifier = Callable[[PassContext], tuple[float, float]]


@dataclass
class PassManager:
    """Run `passes` in order over a context.

    `disabled` passes are skipped, the pipeline ends after `stop_after`, `dump_dir` receives each
    stage's graph as code (plus DOT/SVG pictures of what a pass wants drawn, under `sites/`), `verifier` (if
    given) returns (max abs, max rel) output difference against the original model after every pass, and
    `on_result` is called as each pass finishes.
    """

    passes: list[Pass]
    disabled: frozenset[str] = frozenset()
    stop_after: str | None = None
    dump_dir: Path | None = None
    verifier: Verifier | None = None
    on_result: Callable[[PassResult], None] | None = None

    def __post_init__(self) -> None:
        names = [p.name for p in self.passes]
        for name in list(self.disabled) + ([self.stop_after] if self.stop_after else []):
            if name not in names:
                raise ValueError(f"no pass {name!r} in this pipeline; it is {names}")
        ran: set[str] = set()
        for p in self.passes:
            missing = [need for need in p.requires if need not in ran]
            if p.name not in self.disabled and missing:
                raise ValueError(f"pass {p.name} needs {', '.join(missing)} to run before it (it works on what that "
                                 f"finds); the pipeline is {names}, disabled {sorted(self.disabled)}")
            late = [prior for prior in p.not_after if prior in ran]
            if p.name not in self.disabled and late:
                raise ValueError(f"pass {p.name} cannot run after {', '.join(late)}, which rewrote the attention it "
                                 f"reads; the pipeline is {names}, disabled {sorted(self.disabled)}")
            if p.name not in self.disabled:
                ran.add(p.name)

    def run(self, ctx: PassContext) -> list[PassResult]:
        results = []
        if self.dump_dir is not None:
            _clear_dump(self.dump_dir)
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / DUMP_FILE).write_text(json.dumps({"passes": [p.name for p in self.passes],
                                                               "disabled": sorted(self.disabled)}, indent=1))
            self._dump(ctx, 0, "captured")
        for index, p in enumerate(self.passes, start=1):
            if p.name in self.disabled:
                if p.name == self.stop_after:
                    break
                continue
            before = len(ctx.gm.graph.nodes)
            start = time.perf_counter()
            notes = p.run(ctx) or []
            ctx.gm.recompile()
            seconds = time.perf_counter() - start
            check_graph(ctx.gm, after=p.name)
            result = PassResult(p.name, seconds, before, len(ctx.gm.graph.nodes), list(notes))
            if self.verifier is not None:
                result.max_abs_diff, result.max_rel_diff = self.verifier(ctx)
            if self.dump_dir is not None:
                self._dump(ctx, index, p.name)
                for stem, nodes, title in p.pictures(ctx):
                    write_site_pictures(self.dump_dir / "sites", stem, nodes, title)
            results.append(result)
            if self.on_result is not None:
                self.on_result(result)
            if p.name == self.stop_after:
                break
        return results

    def _dump(self, ctx: PassContext, index: int, name: str) -> None:
        assert self.dump_dir is not None
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{index:02d}_{name}.py").write_text(ctx.gm.code)


#: The file a dump directory holds (the pipeline it ran): what lets the next dump replace the directory.
DUMP_FILE = "lincompile_dump.json"


def check_dump_dir(directory: Path) -> list[Path]:
    """What a previous dump left in `directory` (`NN_<pass>.py` files, `sites/` and `DUMP_FILE`, which a dump
    writes first); FileExistsError when it is a file, or not empty without `DUMP_FILE` (a user's directory, whose
    `sites/` or `01_x.py` a dump must not take for its own), or holding anything a dump does not write."""
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise FileExistsError(f"dump directory {directory} is a file; pass a new or empty directory")
    entries = list(directory.iterdir())
    if entries and not (directory / DUMP_FILE).is_file():
        raise FileExistsError(f"dump directory {directory} is not empty and holds no {DUMP_FILE} (every dump "
                              "writes it; delete a dump from an older lincompile by hand): pass a new or "
                              "empty directory, or a previous dump's")
    foreign = [e.name for e in entries if not (e.name == "sites" and e.is_dir()) and e.name != DUMP_FILE
               and not (e.is_file() and re.fullmatch(r"\d\d_\w+\.py", e.name))]
    if foreign:
        raise FileExistsError(f"dump directory {directory} holds {sorted(foreign)[:3]}, which a dump does not write; "
                              "pass a new or empty directory, or a previous dump's")
    return entries


def _clear_dump(directory: Path) -> None:
    """Empty a previous dump, so stale stages never mix with this run's."""
    for entry in check_dump_dir(directory):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
