"""pyproject.toml and the CI script, as a user or a packager meets them."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_license_is_an_spdx_string_and_the_console_script_is_the_app():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # not the deprecated {text = "MIT"} table
    requires = project["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires), requires
    assert project["project"]["scripts"]["cfcam"] == "cfcam_gpu.app:main"  # checks the app extra first


def test_ci_uses_its_own_virtualenv_not_the_quick_starts():
    script = (REPO / ".ci" / "run").read_text()
    venvs = re.findall(r"-m venv (\S+)", script)
    assert venvs and all(v not in (".venv", ".venv/") for v in venvs), venvs
    assert f". {venvs[0]}/bin/activate" in script
    assert f"{venvs[0]}/" in (REPO / ".gitignore").read_text().split()
