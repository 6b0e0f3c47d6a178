"""Structure: imports run one way, down the pipeline (no import cycles between files or
sub-packages), as checked by the shared tool ``../shared/tools/import_cycles.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO.parent / "shared" / "tools" / "import_cycles.py"


@pytest.mark.skipif(not TOOL.is_file(), reason=f"the import-cycle tool is not beside the project ({TOOL})")
def test_no_import_cycles():
    res = subprocess.run([sys.executable, str(TOOL), "cmpc"], cwd=REPO, capture_output=True, text=True, timeout=120)
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert last.startswith("0 import cycle(s)") and res.returncode == 0, res.stdout + res.stderr


#: The layers, lowest first: a module may import its own layer and the ones below, never above.
LAYERS = (
    ("cmpc.utils", "cmpc.errors", "cmpc.config"),
    ("cmpc.data",),
    ("cmpc.models",),
    ("cmpc.index",),
    ("cmpc.localize",),
    ("cmpc.evaluate",),
    ("cmpc.train",),
    ("cmpc.translate",),  # runs short trainings (translate select); views reach train as an argument
    ("cmpc.pipeline", "cmpc.cli", "cmpc.__main__"),
)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``path`` (module level and inside functions)."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((node.lineno, base))
    return out


def test_nothing_is_imported_upward():
    def layer(name: str) -> int | None:
        for i, tops in enumerate(LAYERS):
            if any(name == t or name.startswith(t + ".") for t in tops):
                return i
        return None

    upward = []
    for path in sorted((REPO / "cmpc").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        own = layer(module)
        if own is None:
            assert module == "cmpc", f"{module} is in no layer of LAYERS; add it"
            continue
        for line, target in _imports(path, module):
            to = layer(target)
            if to is not None and to > own:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert upward == [], "imports against the layers " + " -> ".join("/".join(t.split(".")[1] for t in tops) for tops in LAYERS) + ":\n" + "\n".join(upward)
