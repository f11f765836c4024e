"""The floors: the core (``cfcam_gpu``'s top level and ``cfcam_gpu.methods``) never imports the application
(``cfcam_gpu.app``), and neither ``import cfcam_gpu`` nor the command line's import (what ``cfcam --help``
pays) loads the heavy libraries."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cfcam_gpu"
HEAVY = ("torch._dynamo", "sklearn", "cv2", "matplotlib", "timm", "scipy", "skimage")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("code", ["import cfcam_gpu", "import cfcam_gpu.app.cli",
                                  "from cfcam_gpu.app.cli import build_parser; build_parser().format_help()"])
def test_no_heavy_imports(code):
    modules = _loaded_after(code)
    heavy = [m for m in modules if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY))]
    assert heavy == [], f"{code!r} imports {heavy}"


def test_importing_the_core_does_not_import_the_app():
    modules = _loaded_after("import cfcam_gpu, cfcam_gpu.methods, cfcam_gpu.metrics, cfcam_gpu.compat")
    assert [m for m in modules if m.startswith("cfcam_gpu.app")] == []


def _core_sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts[:1]
                  and p.name != "__main__.py")


def _imported_modules(path: Path, tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; ``from X import y`` counts X and X.y."""
    package = ["cfcam_gpu", *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def test_no_core_module_imports_the_app():
    """Every import statement of the core, also the lazy ones inside functions (``__main__`` is the
    command line's entry point, not core)."""
    sources = _core_sources()
    assert len(sources) > 10
    offenders = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in sources
                 for line, name in _imported_modules(path, ast.parse(path.read_text(encoding="utf-8")))
                 if name == "cfcam_gpu.app" or name.startswith("cfcam_gpu.app.")]
    assert offenders == []
    # the check sees relative imports: cfcam_gpu/__main__.py's "from .app import main" is one
    main = PACKAGE / "__main__.py"
    assert ("cfcam_gpu.app.main" in {name for _, name in _imported_modules(main, ast.parse(main.read_text()))})


def test_application_modules_stay_under_400_lines():
    long = {path.name: n for path in sorted((PACKAGE / "app").glob("*.py"))
            if (n := len(path.read_text(encoding="utf-8").splitlines())) >= 400}
    assert not long, long
