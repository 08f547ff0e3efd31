"""The package layering of DESIGN.md, checked on the source: every `forgetjax` import (module level or inside a
function) goes to the importer's own package or down the layers, never up; packages of an independent layer do not
import each other. A module of a package the table does not name is an error too, so the table stays complete."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: tuple[tuple[str, frozenset[str], bool], ...] = (
    ("core", frozenset({"errors", "io", "paths", "config"}), False),
    ("base", frozenset({"<root>", "api", "assets", "models", "convert", "sharding", "distributed", "host_memory",
                        "sampling", "training", "data", "datahub", "envs", "tasks", "verifiers", "losses"}), False),
    ("components", frozenset({"methods", "eval", "results"}), True),
    ("analysis", frozenset({"analysis"}), False),
    ("study", frozenset({"study"}), False),
    ("report", frozenset({"report"}), False),
    ("entry points", frozenset({"cli", "__main__", "quickstart"}), False),
)
"""(name, packages, independent) from the bottom up; `<root>` is `forgetjax/__init__.py`. A package may import its
own modules and those of lower layers; of its own layer only when the layer is not independent."""


@dataclasses.dataclass(frozen=True)
class Import:
    module: str
    target: str
    path: Path
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The first component below the top package: `forgetjax.study.runner` -> "study", `forgetjax` -> "<root>"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, root: Path, top: str) -> list[Import]:
    """Every import of a `top` module in the file, at any depth (functions, methods, conditionals); `from X import
    name` counts as an import of X.name when that is a module, else of X."""
    module = module_name(path, root)
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package_parts[: len(package_parts) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{stem}.{alias.name}" if _is_module(f"{stem}.{alias.name}", root) else stem
                       for alias in node.names]
        else:
            continue
        found += [Import(module, t, path, node.lineno) for t in targets if t == top or t.startswith(top + ".")]
    return found


def layer_index(layers, package: str) -> int | None:
    for index, (_, packages, _) in enumerate(layers):
        if package in packages:
            return index
    return None


def violations(root: Path, top: str = "forgetjax", layers=LAYERS) -> list[str]:
    """'path:line: importer (layer) imports target (layer)' for every import the layering forbids."""
    problems: list[str] = []
    for path in sorted((root / top).rglob("*.py")):
        module = module_name(path, root)
        source = package_of(module)
        if layer_index(layers, source) is None:
            problems.append(f"{path.relative_to(root)}:1: package {source!r} is in no layer; add it to LAYERS")
            continue
        for item in imports_of(path, root, top):
            target = package_of(item.target)
            if target == source:
                continue
            low, high = layer_index(layers, target), layer_index(layers, source)
            allowed = low is not None and (low < high or (low == high and not layers[high][2]))
            if not allowed:
                target_layer = "no layer" if low is None else layers[low][0]
                problem = (f"{path.relative_to(root)}:{item.line}: {module} ({layers[high][0]}) imports {item.target} "
                           f"({target_layer})")
                if problem not in problems:
                    problems.append(problem)
    return problems


def test_no_import_goes_up_the_layers():
    problems = violations(ROOT)
    assert not problems, "imports against the layering (DESIGN.md, Layers):\n" + "\n".join(problems)


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


SYNTHETIC_LAYERS = (
    ("low", frozenset({"<root>", "low", "low2"}), False),
    ("mid", frozenset({"left", "right"}), True),
    ("top", frozenset({"top"}), False),
)


def test_checker_finds_planted_upward_and_sibling_imports(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "import os\nfrom pkg.low2 import b\n\n\ndef f():\n    from pkg.top import main\n    return main\n",
        "low2/__init__.py": "",
        "low2/b.py": "from . import c\n",
        "low2/c.py": "",
        "left/__init__.py": "from pkg.low import a\n",
        "left/x.py": "from ..right import y\n",
        "right/__init__.py": "",
        "right/y.py": "import pkg.low.a\n",
        "top/__init__.py": "",
        "top/main.py": "from pkg import left, right\nfrom pkg.left.x import y\n",
    })
    found = violations(root, "pkg", SYNTHETIC_LAYERS)
    assert found == [
        "pkg/left/x.py:1: pkg.left.x (mid) imports pkg.right.y (mid)",
        "pkg/low/a.py:6: pkg.low.a (low) imports pkg.top.main (top)",
    ]


def test_checker_names_a_package_outside_every_layer(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "stray/__init__.py": "", "stray/z.py": "x = 1\n"})
    assert violations(root, "pkg", SYNTHETIC_LAYERS) == [
        "pkg/stray/__init__.py:1: package 'stray' is in no layer; add it to LAYERS",
        "pkg/stray/z.py:1: package 'stray' is in no layer; add it to LAYERS",
    ]


@pytest.mark.parametrize("text, target", [
    ("from forgetjax.study import runner\n", "forgetjax.study.runner"),
    ("from forgetjax import study\n", "forgetjax.study"),
    ("import forgetjax.study.runner as r\n", "forgetjax.study.runner"),
    ("from ..study.runner import x\n", "forgetjax.study.runner"),
    ("from .. import study\n", "forgetjax.study"),
])
def test_import_forms_resolve_to_their_package(tmp_path, text, target):
    _package(tmp_path, {"__init__.py": "", "study/__init__.py": "", "study/runner.py": "x = 1\n"})
    (tmp_path / "pkg").rename(tmp_path / "forgetjax")
    path = tmp_path / "forgetjax" / "data" / "m.py"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    (item,) = imports_of(path, tmp_path, "forgetjax")
    assert item.target == target and package_of(item.target) == "study"
