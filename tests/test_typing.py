"""The package ships ``py.typed``: its annotations are what users' type checkers read, so
they must hold (mypy over both packages, as configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_package_is_marked_typed() -> None:
    assert (REPO / "sa_jobs" / "py.typed").is_file()


def test_the_package_type_checks(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    command = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "-p", "sa_jobs", "-p", "alembic_ext"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
