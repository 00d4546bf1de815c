"""The read-only web view ``/ui`` for auditors and whoever is on call (docs/audit.md).

``routes`` renders the command layer as HTML, ``session`` is the login cookie, ``verify`` the
on-demand chain check; templates and the stylesheet ship in this package.
"""

from __future__ import annotations

from monitor.web.routes import CONTENT_SECURITY_POLICY, UiState, ui_router
from monitor.web.session import COOKIE, Sessions, bearer_matches

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "COOKIE",
    "Sessions",
    "UiState",
    "bearer_matches",
    "ui_router",
]
