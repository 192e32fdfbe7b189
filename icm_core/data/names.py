"""Category names: they become folder names and artifact keys, so they are checked once, here."""

from __future__ import annotations

import re


CATEGORY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def validate_category_name(name: str, field: str = "name") -> str:
    """Category names become folder names and artifact keys: lowercase letters, digits, '-' and '_'."""
    if not isinstance(name, str) or not CATEGORY_NAME_RE.fullmatch(name):
        raise ValueError(
            f"{field}: invalid category name {name!r}; use 1-64 lowercase letters, digits, '-' or '_' "
            "(no path separators, no '..')"
        )
    return name
