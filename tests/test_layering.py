"""The package's layers, read from the source's own import statements (no imports run, no models):
the run-time code (decoding/) must not depend on the offline tuner (tuning/), and the cost model both
read (costs/) sits below both."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mirror_deploy"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved, lazy ones included."""
    parts = ["mirror_deploy", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)   # `from . import tuning`
    return out


def offenders(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    return found


def test_the_import_reader_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    # The check below is only as good as this reader: a relative, a lazy and a from-package import.
    fake = tmp_path / "mirror_deploy"
    (fake / "decoding").mkdir(parents=True)
    source = fake / "decoding" / "policy.py"
    source.write_text("from ..tuning import model\n"
                      "def f():\n    from ..tuning.store import read_tuning\n"
                      "from .. import tuning\nimport mirror_deploy.tuning.curves\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert offenders("decoding", ("mirror_deploy.tuning",)) == [
        f"mirror_deploy/decoding/policy.py imports {m}" for m in
        ("mirror_deploy.tuning", "mirror_deploy.tuning.curves", "mirror_deploy.tuning.model",
         "mirror_deploy.tuning.store", "mirror_deploy.tuning.store.read_tuning")]


@pytest.mark.parametrize("layer, forbidden", [
    ("decoding", ("mirror_deploy.tuning", "mirror_deploy.bench", "mirror_deploy.cli")),
    ("costs", ("mirror_deploy.decoding", "mirror_deploy.tuning", "mirror_deploy.runtimes", "mirror_deploy.bench")),
    ("runtimes", ("mirror_deploy.decoding", "mirror_deploy.tuning", "mirror_deploy.bench")),
    ("tuning", ("mirror_deploy.bench", "mirror_deploy.cli")),   # the timing both use sits below both
    ("check", ("mirror_deploy.bench", "mirror_deploy.cli")),
])
def test_a_layer_imports_nothing_above_it(layer, forbidden):
    assert offenders(layer, forbidden) == []


def test_the_package_root_holds_few_modules():
    """Concerns live in their rooms (check/, tiny/, ...): the root keeps the entry points and the shared basics."""
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 13, root


def test_the_speculative_loop_reads_at_a_glance():
    source = (PACKAGE / "decoding" / "speculative.py").read_text()
    tree = ast.parse(source)
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "speculative")
    assert loop.end_lineno - loop.lineno + 1 <= 40
