"""The built-in text sources of the category library, one module per source family.

* :mod:`~icm_core.data.corpora.gensim_data`   -- text in the ``gensim`` wheel (PyPI): Wikipedia, news, reviews,
  newsgroups, word-pair tables; :mod:`~icm_core.data.corpora.mediawiki` parses its Wikipedia dump;
* :mod:`~icm_core.data.corpora.python_stdlib` -- the running interpreter's standard library (code, pydoc topics);
* :mod:`~icm_core.data.corpora.debian`        -- Debian packages fetched by ``make corpora`` (docs, code in ten
  languages, quotes, dictionaries, data tables); :mod:`~icm_core.data.corpora.markup` strips their HTML;
* :mod:`~icm_core.data.corpora.user`          -- a user's own ``.txt`` / ``.jsonl`` files and folders.

``BUILTIN_SOURCES`` (:mod:`~icm_core.data.corpora.sources`) maps a source id (``builtin:<id>`` in a category file)
to its source; ``DEMO_SOURCES`` names the five the default pipeline (``make demo``) runs.
"""
