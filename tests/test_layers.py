"""Imports only point down the layers, and no module uses another module's private names (#19).

The levels, top first (a package is a folder under rcllm/, or a top-level module)::

    cli            rcllm/cli
    app            rcllm/demo.py, rcllm/train, rcllm/eval
    serve, build   rcllm/serve, rcllm/build
    store, data    rcllm/store, rcllm/data
    engine         rcllm/engine
    kernels        rcllm/kernels
    base           rcllm/__init__.py, rcllm/assets.py, rcllm/files.py

A module may import its own package and any package on a lower level. An import of a higher
level points up; an import of another package on the same level points sideways: both fail.
Every import counts, also one inside a function or under ``if TYPE_CHECKING:`` (a lazy import is
still an arrow); relative imports are resolved first.

Where the less obvious packages sit, and why:

- build (offline: embed, place, precompute KV) is on the serve level, beside serve. It uses
  engine, store and data; cli, demo and eval call it. Serve and build never import each other:
  a serving node reads the cache through rcllm/store (the layout names, the placement record),
  not through the code that wrote it, so it does not load faiss clustering or the embedder.
- store and data are siblings and neither imports the other: the block store knows nothing of
  catalogs or histories, the formats nothing of KV. Both sit above engine: the manifest records
  the model, the tiers key blocks by the ranker's block key, the MovieLens loader keeps its
  download in the engine's user cache folder.
- demo, train and eval are siblings: what two of them share lives lower (the ranking metrics in
  rcllm/data/metrics.py, the prefix-caching baseline in rcllm/engine/prefix_cache.py).
- top-level helpers go by what they import: rcllm/__init__.py, rcllm/assets.py and rcllm/files.py
  import nothing of rcllm, so they are the base everyone may use (rcllm/files.py: the atomic
  writes of every layer, from the engine's fingerprint sidecars to the CLI's result files). A new
  package or top-level module fails until it is given a level in LEVELS.

Private names: ``from rcllm.x import _name`` fails, and so does ``obj._name`` (``rcllm.x._name``
included) when ``_name`` is defined — a def, a class, an assignment, ``self._name = ...`` — only
in other rcllm modules. ``self._x``, ``cls._x`` and ``super()._x`` stay inside their class.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LEVELS = (  # top first
    ("cli", ("rcllm.cli",)),
    ("app", ("rcllm.demo", "rcllm.train", "rcllm.eval")),
    ("serve/build", ("rcllm.serve", "rcllm.build")),
    ("store/data", ("rcllm.store", "rcllm.data")),
    ("engine", ("rcllm.engine",)),
    ("kernels", ("rcllm.kernels",)),
    ("base", ("rcllm", "rcllm.assets", "rcllm.files")),
)
HEIGHT = {package: len(LEVELS) - i for i, (_, packages) in enumerate(LEVELS) for package in packages}
LEVEL = {package: name for name, packages in LEVELS for package in packages}
PRIVATE_FIX = "make it public in {owner} (drop the underscore) if {user} really needs it, or move the code using it there"


@dataclass
class Module:
    path: str  # relative to the repository, e.g. rcllm/engine/forward.py
    name: str  # rcllm.engine.forward
    is_package: bool  # an __init__.py
    tree: ast.Module


def package_of(module: str) -> str:
    """The package a module belongs to: rcllm.engine.forward -> rcllm.engine, rcllm.demo -> rcllm.demo."""
    return ".".join(module.split(".")[:2])


def parse(sources: dict[str, str]) -> list[Module]:
    modules = []
    for path, text in sorted(sources.items()):
        parts = Path(path).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules.append(Module(path, name, is_package, ast.parse(text, filename=path)))
    return modules


def absolute(module: Module, target: str | None, level: int) -> str:
    """``from <level dots><target> import ...`` in ``module``, as an absolute module name."""
    if level == 0:
        return target or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(module: Module, known: set[str]):
    """(line, imported module, imported name or None) for every rcllm import of ``module``;
    ``from rcllm.x import y`` names the module rcllm.x.y when y is one."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node.module, node.level)
            found = [
                (f"{base}.{alias.name}", None) if f"{base}.{alias.name}" in known else (base, alias.name)
                for alias in node.names
            ]
        else:
            continue
        for target, name in found:
            if target == "rcllm" or target.startswith("rcllm."):
                yield node.lineno, target, name


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_definitions(module: Module) -> set[str]:
    """Private names ``module`` defines: module- and class-level defs, classes and assignments,
    and attributes it assigns on ``self`` or ``cls``."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(stmt.name)
                if isinstance(stmt, ast.ClassDef):
                    visit(stmt.body)
                continue
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
            for target in targets:
                for node in ast.walk(target) if target is not None else ():
                    if isinstance(node, ast.Name):
                        names.add(node.id)
            for field in ("body", "orelse", "finalbody"):  # if / try / with / for at this level
                visit(getattr(stmt, field, []))
            for handler in getattr(stmt, "handlers", []):
                visit(handler.body)

    visit(module.tree.body)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and own(node.value):
            names.add(node.attr)
    return {n for n in names if is_private(n)}


def own(value: ast.expr) -> bool:
    """``self``, ``cls`` or ``super()``: the class reaching its own attributes."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"


def check(sources: dict[str, str]) -> list[str]:
    """Every layering and privacy problem in ``sources`` (repository path -> text), one line each."""
    modules = parse(sources)
    known = {m.name for m in modules}
    defined_in: dict[str, set[str]] = defaultdict(set)
    for m in modules:
        for name in private_definitions(m):
            defined_in[name].add(m.name)
    problems: set[tuple[str, int, str]] = set()  # a set: a from-import of several names is one arrow
    for m in modules:
        here = package_of(m.name)
        if here not in HEIGHT:
            problems.add((m.path, 0, f"{m.path}: package {here} has no level; fix: add it to LEVELS in "
                          "tests/test_layers.py, above every package it imports and below every one that imports it"))
            continue
        for line, target, name in imports(m, known):
            there = package_of(target)
            arrow = f"{m.path}:{line}: {m.name} -> {target}"
            if there not in HEIGHT:
                problems.add((m.path, line, f"{arrow}: {there} is no rcllm package with a level; fix: import an existing module"))
            elif there != here and HEIGHT[there] > HEIGHT[here]:
                problems.add((m.path, line, f"{arrow} points up ({LEVEL[here]} -> {LEVEL[there]}); fix: move what "
                              f"{m.name} needs from {target} down to the {LEVEL[here]} level or below, or move this code up"))
            elif there != here and HEIGHT[there] == HEIGHT[here]:
                problems.add((m.path, line, f"{arrow} points sideways ({here} and {there} are siblings on the "
                              f"{LEVEL[here]} level); fix: move what {m.name} needs from {target} below the {LEVEL[here]} level"))
            if name is not None and is_private(name):
                problems.add((m.path, line, f"{m.path}:{line}: {m.name} imports {name}, private to {target}; "
                              f"fix: {PRIVATE_FIX.format(user=m.name, owner=target)}"))
        mine = private_definitions(m)
        for node in ast.walk(m.tree):
            if not isinstance(node, ast.Attribute) or not is_private(node.attr) or own(node.value) or node.attr in mine:
                continue
            owners = ", ".join(sorted(defined_in.get(node.attr, set()) - {m.name}))
            if owners:
                problems.add((m.path, node.lineno, f"{m.path}:{node.lineno}: {m.name} uses .{node.attr}, private to "
                              f"{owners}; fix: {PRIVATE_FIX.format(user=m.name, owner=owners)}"))
    return [text for _, _, text in sorted(problems)]


def rcllm_sources() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / "rcllm").rglob("*.py"))}


def test_rcllm_imports_point_down_and_use_no_private_names_of_other_modules():
    sources = rcllm_sources()
    assert "rcllm/engine/forward.py" in sources  # the scan sees the package, not an empty folder
    problems = check(sources)
    assert not problems, f"{len(problems)} layering problems:\n" + "\n".join(problems)


# --- the checker itself: each rule fails on a planted violation ------------------------------

PACKAGES = {
    "rcllm/__init__.py": "",
    "rcllm/kernels/__init__.py": "",
    "rcllm/engine/__init__.py": "",
    "rcllm/serve/__init__.py": "",
    "rcllm/serve/node.py": "def run():\n    pass\n",
    "rcllm/eval/__init__.py": "",
    "rcllm/eval/metrics.py": "def summarize():\n    pass\n",
    "rcllm/train/__init__.py": "",
}


def problems_with(files: dict[str, str]) -> list[str]:
    """``check`` on the skeleton PACKAGES plus ``files``."""
    return check({**PACKAGES, **files})


def test_a_planted_upward_import_in_the_real_package_fails():
    sources = rcllm_sources()
    planted = {**sources, "rcllm/kernels/planted.py": "from rcllm.engine.forward import BlockEngine\n"}
    (problem,) = set(check(planted)) - set(check(sources))
    assert problem.startswith("rcllm/kernels/planted.py:1: rcllm.kernels.planted -> rcllm.engine.forward points up")
    assert "(kernels -> engine)" in problem and "fix: move what" in problem


def test_upward_imports_fail_inside_functions_under_type_checking_and_when_relative():
    lazy = "import os\n\n\ndef f():\n    from rcllm.serve import node\n    return node\n"
    (problem,) = problems_with({"rcllm/engine/lazy.py": lazy})
    assert problem.startswith("rcllm/engine/lazy.py:5: rcllm.engine.lazy -> rcllm.serve.node points up (engine -> serve/build)")
    (problem,) = problems_with({"rcllm/engine/rel.py": "from ..serve.node import run\n"})
    assert "rcllm/engine/rel.py:1: rcllm.engine.rel -> rcllm.serve.node points up" in problem
    (problem,) = problems_with({"rcllm/engine/top.py": "from rcllm import serve\n"})
    assert "rcllm.engine.top -> rcllm.serve points up" in problem
    typing_only = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from rcllm.serve.node import run\n"
    (problem,) = problems_with({"rcllm/kernels/typed.py": typing_only})
    assert "rcllm/kernels/typed.py:4: rcllm.kernels.typed -> rcllm.serve.node points up" in problem


def test_an_import_of_a_sibling_package_fails_as_sideways():
    (problem,) = problems_with({"rcllm/train/report.py": "import rcllm.eval.metrics\n"})
    assert "rcllm/train/report.py:1: rcllm.train.report -> rcllm.eval.metrics points sideways" in problem
    assert "rcllm.train and rcllm.eval are siblings on the app level" in problem


def test_downward_same_package_and_relative_imports_pass():
    assert problems_with({
        "rcllm/eval/runner.py": "from rcllm.serve.node import run\nfrom . import metrics\nfrom .metrics import summarize\n",
        "rcllm/engine/forward.py": "from rcllm import kernels\nimport rcllm\n",
    }) == []


def test_a_package_without_a_level_fails():
    (problem,) = problems_with({"rcllm/newpkg/tool.py": "import json\n"})
    assert problem.startswith("rcllm/newpkg/tool.py: package rcllm.newpkg has no level")


def test_private_names_fail_outside_the_module_that_defines_them():
    forward = (
        "class _Prompt:\n    pass\n\n\n"
        "class Engine:\n    def _layer(self):\n        self._seen = True\n\n"
        "    def run(self):\n        return self._layer(), _Prompt(), self._seen\n"
    )
    graphs = (
        "from rcllm.engine.forward import Engine, _Prompt\n\n\n"
        "def replay(engine: Engine):\n    return engine._layer(), engine._seen, _Prompt\n"
    )
    problems = problems_with({"rcllm/engine/forward.py": forward, "rcllm/engine/graphs.py": graphs})
    assert len(problems) == 3, problems
    assert problems[0].startswith("rcllm/engine/graphs.py:1: rcllm.engine.graphs imports _Prompt, private to rcllm.engine.forward")
    assert any(p.startswith("rcllm/engine/graphs.py:5: rcllm.engine.graphs uses ._layer, private to rcllm.engine.forward") for p in problems)
    assert any("._seen, private to rcllm.engine.forward" in p for p in problems)
    # a module attribute is caught the same way; dunders and names no rcllm module defines are not
    (problem,) = problems_with({
        "rcllm/engine/forward.py": forward,
        "rcllm/eval/use.py": "import torch\nimport rcllm.engine.forward\n\n"
        "x = rcllm.engine.forward._Prompt, torch._C, rcllm.__name__\n",
    })
    assert problem.startswith("rcllm/eval/use.py:4: rcllm.eval.use uses ._Prompt, private to rcllm.engine.forward")


MAX_LINES = 500


def test_no_module_is_over_500_lines():
    """A module that outgrows one screenful of jobs is split by job before it lands (issue #19)."""
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / "rcllm").rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"
