"""Where the parameters of a run that arrives through a deployment may point (docs/reliability.md, threat model).

Anyone who may start a deployment run chooses its parameters; a person running the CLI on their own machine is
not confined. For a deployment run the flows call :func:`confine` on each path parameter before any task starts:

- ``root`` (the artifacts root) inside the **allowed roots**: the setting ``allowed_roots``, from
  ``$ICM_ALLOWED_ROOTS`` on the worker (comma-separated local folders and fsspec URL prefixes), by default the
  checkout's ``artifacts/``;
- category files (``categories_file``, ``registry``) inside the **allowed registries** (``$ICM_ALLOWED_REGISTRIES``,
  by default the checkout's ``categories/``);
- an output folder (``out``) inside the run's root;
- no ``trust_remote_code`` anywhere in its config (a model repository's own Python would run on the worker) unless
  the worker allows it (``$ICM_ALLOW_REMOTE_CODE=1``).

Local paths are compared after resolving them (``~``, ``..``, symlinks; relative paths from the working directory,
the checkout in a deployment run). fsspec URLs are compared as normalized strings by prefix with a trailing
separator, so ``s3://bucket-evil`` is not inside ``s3://bucket``; ``file://`` URLs are local paths.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


ROOTS_ENV = "ICM_ALLOWED_ROOTS"
REGISTRIES_ENV = "ICM_ALLOWED_REGISTRIES"
REMOTE_CODE_ENV = "ICM_ALLOW_REMOTE_CODE"


class ConfinementError(ValueError):
    """A deployment run's parameter points outside the places allowed for it. One line: the parameter, the value,
    the allowed places and the setting that lists them."""


def _is_url(value: str) -> bool:
    return "://" in value


def place(value: str | Path, base: Path | None = None) -> str:
    """The canonical form of a folder or file location, for prefix comparison.

    Local paths (and ``file://`` URLs) become absolute resolved paths (symlinks followed, ``..`` removed; relative
    ones from ``base``, default the working directory). Other URLs keep their scheme (lower-cased) and have their
    path normalized (``//`` and ``..`` collapsed, no trailing slash).

    Raises:
        ConfinementError: A URL whose ``..`` climbs above its bucket / host.
    """
    text = str(value).strip()
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not _is_url(text):
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        return str(path.resolve())
    scheme, _, rest = text.partition("://")
    if not rest.strip("/"):
        raise ConfinementError(f"{value!r}: a URL without a bucket or host")
    normalized = posixpath.normpath("/" + rest).lstrip("/")
    if normalized.startswith("..") or normalized in ("", "."):
        raise ConfinementError(f"{value!r}: the URL's path climbs above its bucket or host")
    return f"{scheme.lower()}://{normalized}"


def is_inside(value: str | Path, places: Iterable[str | Path], base: Path | None = None) -> bool:
    """Whether ``value`` is one of ``places`` or lies under one of them (see :func:`place`)."""
    try:
        target = place(value, base)
    except ConfinementError:
        return False
    for allowed in places:
        prefix = place(allowed, base)
        if target == prefix or target.startswith(prefix.rstrip("/") + "/"):
            return True
    return False


def parse_places(setting: str | None, default: Sequence[str | Path]) -> list[str]:
    """The places of a comma-separated setting (``$ICM_ALLOWED_ROOTS``), or ``default`` when it is unset or blank."""
    given = [p.strip() for p in (setting or "").split(",") if p.strip()]
    return given or [str(p) for p in default]


def confine(
    parameter: str, value: str | Path | None, places: Sequence[str | Path], setting: str, base: Path | None = None
) -> None:
    """Refuse ``value`` of ``parameter`` unless it is inside one of ``places``; None (not given) passes.

    Args:
        parameter: The run parameter's name, for the message (``root``, ``categories_file``, ``out``, ...).
        value: Its value (a folder, file or URL).
        places: The allowed places.
        setting: Where ``places`` come from, for the message (``$ICM_ALLOWED_ROOTS``, ``inside root``, ...).
        base: Folder that relative paths start from (default: the working directory).

    Raises:
        ConfinementError: One line naming the parameter, its value and the allowed places.
    """
    if value is None or is_inside(value, places, base):
        return
    shown = ", ".join(_shown(p, base) for p in places) or "(none)"
    raise ConfinementError(
        f"{parameter}: {str(value)!r} is outside the places allowed for a deployment run ({setting}): {shown}"
    )


def _shown(allowed: str | Path, base: Path | None) -> str:
    try:
        return place(allowed, base)
    except ConfinementError:
        return str(allowed)


def remote_code_fields(tree: Any, prefix: str = "config") -> list[str]:
    """Dotted names of the ``*trust_remote_code*`` fields set to true in a config tree (a pydantic ``model_dump``)."""
    found: list[str] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}.{key}"
            if "trust_remote_code" in str(key) and value is True:
                found.append(name)
            else:
                found += remote_code_fields(value, name)
    elif isinstance(tree, list | tuple):
        for index, value in enumerate(tree):
            found += remote_code_fields(value, f"{prefix}[{index}]")
    return found


def refuse_remote_code(tree: Any, prefix: str = "config") -> None:
    """Refuse a config that lets a model repository run its own code (see :func:`remote_code_fields`).

    Raises:
        ConfinementError: One line naming the first such field and the worker setting that allows it.
    """
    fields = remote_code_fields(tree, prefix)
    if fields:
        raise ConfinementError(
            f"{fields[0]}: a deployment run may not run a model repository's code on the worker; set "
            f"{REMOTE_CODE_ENV}=1 in the worker's environment to allow it"
        )
