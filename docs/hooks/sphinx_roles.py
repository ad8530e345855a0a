"""MkDocs hook: the Sphinx roles of pfedlora's docstrings (``:func:`x```, ``:class:`~a.b.C```) shown as code.

The docstrings are written for both readers of the source and the API pages; mkdocstrings renders their
``double backtick`` spans as code but leaves a role's prefix as text. This drops the prefix, and for the
``~`` form keeps the last dotted name, as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _shown(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """MkDocs' page hook: every role prefix in the rendered page dropped."""
    return ROLE.sub(_shown, html)
