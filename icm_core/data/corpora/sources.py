"""Every built-in text source by id: the demo's five, then the rest of the library."""

from __future__ import annotations

from icm_core.data.corpora.base import BuiltinSource
from icm_core.data.corpora.debian import DEBIAN_SOURCES
from icm_core.data.corpora.gensim_data import GENSIM_SOURCES
from icm_core.data.corpora.python_stdlib import PYTHON_SOURCES


__all__ = ["BUILTIN_SOURCES", "DEMO_SOURCES"]

DEMO_SOURCES: tuple[str, ...] = ("wikipedia", "news", "reviews", "python-code", "python-docs")
"""The demo's categories, in the demo's order (``make demo`` runs exactly these)."""

BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    **{name: {**GENSIM_SOURCES, **PYTHON_SOURCES}[name] for name in DEMO_SOURCES},
    **{name: source for name, source in GENSIM_SOURCES.items() if name not in DEMO_SOURCES},
    **DEBIAN_SOURCES,
}
"""Every built-in source: the demo's five first, then the rest of the library."""
