"""The lean core and the app extra: importing ``cfcam_gpu`` and its public modules pulls in nothing but
torch, numpy and the standard library; the command line without the ``app`` extra says which packages
are missing and names ``pip install "cfcam-gpu[app]"`` (one line, exit code 2, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import cfcam_gpu
from cfcam_gpu import app

HEAVY = ("torchvision", "scipy", "sklearn", "skimage", "matplotlib", "PIL", "tqdm", "timm", "cv2")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_core_imports_only_torch_numpy_and_stdlib():
    # torch itself may import some of these (torch.hub imports tqdm when it is installed): compare with
    # what torch and numpy alone load.
    proc = _python("""
        import importlib, json, pkgutil, sys
        import numpy, torch
        before = set(sys.modules)
        import cfcam_gpu
        names = [m.name for m in pkgutil.walk_packages(cfcam_gpu.__path__, "cfcam_gpu.")
                 if not m.name.startswith(("cfcam_gpu.app", "cfcam_gpu.__main__"))]
        for name in names:
            importlib.import_module(name)
        print(json.dumps({"names": names, "new": sorted({m.split(".")[0] for m in set(sys.modules) - before})}))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"cfcam_gpu.engine", "cfcam_gpu.methods", "cfcam_gpu.reference", "cfcam_gpu.metrics"} <= set(out["names"])
    allowed = set(sys.stdlib_module_names) | {"cfcam_gpu", "torch", "numpy"}
    assert [m for m in out["new"] if m.lstrip("_") not in allowed and m not in allowed] == []
    assert not set(out["new"]) & set(HEAVY)


def test_app_package_itself_adds_only_stdlib_to_the_core():
    # so that its main() can report a missing extra instead of failing on an import
    proc = _python("""
        import sys
        import cfcam_gpu
        before = set(sys.modules)
        import cfcam_gpu.app
        print(" ".join(sorted(set(sys.modules) - before)))
    """)
    assert proc.returncode == 0, proc.stderr
    new = proc.stdout.split()
    assert "cfcam_gpu.app" in new
    assert [m for m in new if m != "cfcam_gpu.app" and m.split(".")[0] not in sys.stdlib_module_names] == []


def test_main_without_the_extra_names_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # find_spec and import both see timm as absent
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert app.missing_extra() == ["timm", "tqdm"]
    assert app.main(["explain", "--demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "cfcam-gpu[app]"' in err and "timm, tqdm are" in err


def test_complete_extra_runs_the_command_line(capsys):
    assert app.missing_extra() == []  # the test extra includes the app extra
    assert app.main(["--version"]) == 0
    assert cfcam_gpu.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("how", ["module", "import_cli"])
def test_command_line_without_the_extra_in_a_fresh_interpreter(how):
    run = ("import runpy; runpy.run_module('cfcam_gpu', run_name='__main__')" if how == "module"
           else "import cfcam_gpu.app.cli")
    proc = _python(f"""
        import sys
        sys.modules["matplotlib"] = None
        sys.argv = ["cfcam", "explain", "--demo"]
        {run}
    """)
    assert proc.returncode != 0
    assert 'pip install "cfcam-gpu[app]"' in proc.stderr and "matplotlib is not installed" in proc.stderr
    if how == "module":  # the console script's path: one line, exit code 2, no traceback
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    else:  # importing the command line's module raises the same message
        assert "MissingExtraError" in proc.stderr


def _private_imports(source: str) -> list[tuple[int, str, str]]:
    """(line, module, name) of every ``from <package module> import _name`` in one module's source."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("cfcam_gpu")):
            found += [(node.lineno, node.module or ".", a.name) for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_the_scan_finds_a_private_import():
    assert _private_imports("from .metrics import upsample, _check_inputs as check\n") == [
        (1, "metrics", "_check_inputs")]
    assert _private_imports("from cfcam_gpu.cluster import _features\nfrom os import _exit\n") == [
        (1, "cfcam_gpu.cluster", "_features")]
    assert _private_imports("from ._checks import check_ndim\nfrom . import __version__\n") == []


def test_no_module_imports_a_private_name_of_another():
    from pathlib import Path

    root = Path(cfcam_gpu.__file__).parent
    found = [f"{path.relative_to(root)}:{line}: from {module} import {name}"
             for path in sorted(root.rglob("*.py")) for line, module, name in _private_imports(path.read_text())]
    assert found == [], "private helpers imported across modules:\n" + "\n".join(found)


def test_percentile_and_dbscan_are_the_functions():
    import importlib

    import torch

    assert callable(cfcam_gpu.percentile) and callable(cfcam_gpu.dbscan)
    assert cfcam_gpu.percentile is importlib.import_module("cfcam_gpu.percentile_ops").percentile
    assert cfcam_gpu.dbscan is importlib.import_module("cfcam_gpu.dbscan_ops").dbscan
    assert cfcam_gpu.percentile(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 50).tolist() == [2.5]
    from pathlib import Path

    package = Path(cfcam_gpu.__file__).parent  # no module of the same name
    assert not [name for name in ("percentile", "dbscan") if (package / f"{name}.py").exists()
                or (package / name).is_dir()]
