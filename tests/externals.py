"""Finding the real Prometheus/Alertmanager binaries: skip where absent, fail in CI."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE = "GENAUTH_MONITOR_REQUIRE_EXTERNALS"


def binary(name: str) -> str:
    """The path of ``name``; a skip (or a failure when CI requires it) if it is not installed."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
    )
    if found is None:
        message = f"{name} is not installed (Debian package; .ci/run installs it)"
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found
