"""The built-in text sources of the category library, one module per source family.

* :mod:`~icm_core.data.corpora.gensim_data`   -- text in the ``gensim`` wheel (PyPI): Wikipedia, news, reviews,
  newsgroups, word-pair tables; :mod:`~icm_core.data.corpora.mediawiki` parses its Wikipedia dump;
* :mod:`~icm_core.data.corpora.python_stdlib` -- the running interpreter's standard library (code, pydoc topics);
* :mod:`~icm_core.data.corpora.debian`        -- Debian packages fetched by ``make corpora`` (docs, code in ten
  languages, quotes, dictionaries, data tables); :mod:`~icm_core.data.corpora.markup` strips their HTML;
* :mod:`~icm_core.data.corpora.user`          -- a user's own ``.txt`` / ``.jsonl`` files and folders.

``BUILTIN_SOURCES`` maps a source id (``builtin:<id>`` in a category file) to its :class:`BuiltinSource`;
``DEMO_SOURCES`` names the five the default pipeline (``make demo``) runs.
"""

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
