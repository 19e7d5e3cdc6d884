"""The layout's promises (ARCHITECTURE.md), checked on the source: layers, no cycles, module size, API size."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import fedlora_lite

PACKAGE = Path(fedlora_lite.__file__).resolve().parent

# which top-level subpackages each one may import (imports go one way: course -> experiments
# -> method (clair, federated, lora, flower) -> core)
ALLOWED = {
    "core": set(),
    "clair": {"core"},
    "lora": {"core"},
    "federated": {"core", "clair"},
    "flower": {"core", "clair", "federated", "lora", "experiments"},
    "experiments": {"core", "clair", "federated", "lora"},
    "course": {"core", "clair", "federated", "lora", "experiments", "flower"},
}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the package that ``name`` imports (absolute names, resolved from relative imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("fedlora_lite"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fedlora_lite"))
    modules = _modules()
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_layers_import_one_way():
    bad = []
    for name, path in _modules().items():
        layer = _layer(name)
        if layer is None or layer not in ALLOWED:
            continue
        for target in _imports(name, path):
            t_layer = _layer(target)
            if t_layer is not None and t_layer != layer and t_layer not in ALLOWED[layer]:
                bad.append(f"{name} -> {target}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_no_import_cycles():
    mods = _modules()
    graph = {n: {t for t in _imports(n, p) if not mods[t].name == "__init__.py"} for n, p in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_modules_stay_small():
    big = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in _modules().items()}
    big = {n: k for n, k in big.items() if k > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_top_level_api_is_small_and_resolves():
    names = fedlora_lite.__all__
    assert len(names) <= 40 and len(set(names)) == len(names)
    for name in names:
        assert getattr(fedlora_lite, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedlora_lite.nope  # noqa: B018


@pytest.mark.parametrize("sub", ["core", "clair", "federated", "lora", "experiments.copy_task"])
def test_subpackage_all_resolves(sub):
    mod = importlib.import_module(f"fedlora_lite.{sub}")
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing and len(set(mod.__all__)) == len(mod.__all__)


def test_every_file_reference_in_docs_exists():
    """Docstrings and docs point at files that exist (e.g. ``docs/CLAIR.md``)."""
    root = PACKAGE.parent
    texts = [p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")]
    texts += [p.read_text(encoding="utf-8") for p in [root / "README.md", root / "ARCHITECTURE.md", root / "docs" / "CLAIR.md"]]
    import re

    refs = set()
    for t in texts:
        refs.update(re.findall(r"``((?:docs|data|benchmarks|notebooks|tests)/[A-Za-z0-9_./-]+\.[a-z]+)``", t))
        refs.update(re.findall(r"\]\(((?:docs|data|benchmarks|notebooks|tests)/[A-Za-z0-9_./-]+\.[a-z]+)\)", t))
    missing = sorted(r for r in refs if "NN_" not in r and not (root / r).exists())
    assert refs and not missing, f"references to missing files: {missing}"
