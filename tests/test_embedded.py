"""sa_jobs.embedded: the zero-setup server's argument checks."""

from __future__ import annotations

import pytest

from sa_jobs import ConfigurationError, embedded


def test_an_unknown_cleanup_mode_is_refused_before_anything_starts(tmp_path):
    """pgserver only asserts the mode: an AssertionError (and under ``python -O``, where
    asserts vanish, any unknown mode removed the data directory at exit, as "delete")."""
    data = tmp_path / "pg"
    with pytest.raises(ConfigurationError, match="cleanup"):
        embedded.start(data, cleanup="keep")
    assert not data.exists()
