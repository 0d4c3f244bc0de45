"""The docs cite tests and files as evidence: every one they name exists (no database)."""

from __future__ import annotations

import re

from .conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
        *sorted((REPO_ROOT / "examples").glob("*/README.md")), REPO_ROOT / "benchmarks" / "RESULTS.md"]
TESTS = REPO_ROOT / "tests"


def _defined_tests() -> dict[str, set[str]]:
    """Test module stem -> the test functions it defines (tests/ and its subpackages)."""
    return {path.stem: set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
            for path in TESTS.rglob("test_*.py")}


def test_every_test_the_docs_cite_exists():
    """A doc that says "`tests/test_x.py::test_y` checks it" is evidence only while test_y
    exists (in test_x.py, when the file is named) and is collected."""
    defined = _defined_tests()
    everywhere = set(defined).union(*defined.values())
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for module, name in re.findall(r"\b(test_\w+)\.py::(test_\w+)", text):
            if name not in defined.get(module, ()):
                missing.append(f"{doc.name}: {module}.py::{name}")
        for name in set(re.findall(r"\btest_\w+", text)) - everywhere:
            missing.append(f"{doc.name}: {name}")
    assert not missing, missing


def test_every_repository_file_the_docs_cite_exists():
    """Paths in backticks or links (`sa_jobs/worker/worker.py`, `examples/grafana/...`) name
    files of this repository; result JSON under benchmarks/results/ is git-ignored."""
    roots = ("sa_jobs/", "alembic_ext/", "tests/", "examples/", "benchmarks/", "docs/", ".ci/")
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        cited = re.findall(r"`([\w./-]+)`", text) + re.findall(r"\]\(([^)#\s]+)\)", text)
        for path in cited:
            path = path.split("::")[0]
            if path.startswith("benchmarks/results/") or path.startswith(("http://", "https://")):
                continue
            here = (doc.parent / path).resolve()
            if path.startswith(roots) and not (REPO_ROOT / path).exists() or (
                path.startswith("../") and not here.exists()
            ):
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing


def test_the_public_api_section_names_every_export():
    """docs/core.md's "public API at a glance" says it lists everything sa_jobs/__init__.py
    exports: each name of ``__all__`` appears there (EmbeddedServerError did not)."""
    import sa_jobs

    text = (REPO_ROOT / "docs" / "core.md").read_text()
    section = text.split("## The public API at a glance", 1)[1].split("\n## ", 1)[0]
    unnamed = [name for name in sa_jobs.__all__ if not re.search(rf"\b{name}\b", section)]
    assert not unnamed, f"exported but not in docs/core.md's public API section: {unnamed}"
