"""Fetch the Debian packages the category library reads: ``apt-get download`` then ``dpkg-deb -x`` into a
project-local folder, nothing installed (``make corpora`` runs ``python -m icm_core.data.corpora.debian_fetch``).

A package is extracted to ``<root>/<package>/`` and recorded in ``<root>/<package>.json`` (version and the
``.deb``'s sha256), written atomically and last, so a half-extracted package never counts as present."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from icm_core.data.corpora.debian import (
    DEBIAN_DIR_ENV,
    DEFAULT_DEBIAN_DIR,
    debian_packages,
    debian_root,
    package_record,
)
from icm_core.data.text import DataError
from icm_core.infra.io import sha256_file, write_json


def _run(command: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, check=False)


def fetch_packages(packages: Sequence[str], root: Path | None = None, update: bool = True) -> dict[str, dict]:
    """Download and extract Debian packages that are not yet under ``root`` (nothing is installed).

    Each package: ``apt-get download`` into a temporary folder, ``dpkg-deb -x`` into a temporary tree,
    rename the tree to ``<root>/<package>``, then write ``<root>/<package>.json``. When a download fails
    and ``update`` is set, ``apt-get update`` runs once and the download is retried (a clean machine has
    no package lists).

    Args:
        packages: Debian package names.
        root: Destination (default :func:`debian_root`).
        update: Allow one ``apt-get update`` after a failed download.

    Returns:
        The record of every requested package.

    Raises:
        DataError: apt-get or dpkg-deb is missing, or a package cannot be downloaded or extracted
            (the message names the package and quotes the tool's error).
    """
    root = (root or debian_root()).absolute()
    root.mkdir(parents=True, exist_ok=True)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataError(f"{tool} not found: the Debian corpora need a Debian or Ubuntu machine (apt and dpkg)")
    records: dict[str, dict] = {}
    updated = not update
    for package in packages:
        record = package_record(package, root)
        if record is not None:
            records[package] = record
            continue
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{package}-") as tmp:
            work = Path(tmp)
            result = _run(["apt-get", "download", package], work)
            if result.returncode != 0 and not updated:
                _run(["apt-get", "update", "-qq"], work)
                updated = True
                result = _run(["apt-get", "download", package], work)
            debs = sorted(work.glob("*.deb"))
            if result.returncode != 0 or len(debs) != 1:
                raise DataError(f"Debian package {package!r}: apt-get download failed: {result.stderr.strip()[-400:]}")
            tree = work / "tree"
            result = _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], work)
            if result.returncode != 0:
                raise DataError(f"{debs[0]}: dpkg-deb -x failed: {result.stderr.strip()[-400:]}")
            version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"], work).stdout.strip()
            target = root / package
            if target.exists():
                shutil.rmtree(target)
            tree.rename(target)
            record = {"package": package, "version": version, "deb": debs[0].name, "deb_sha256": sha256_file(debs[0])}
            write_json(root / f"{package}.json", record)
        records[package] = record
    return records


def main(argv: list[str] | None = None) -> int:
    """``python -m icm_core.data.corpora.debian_fetch [--root DIR]``: fetch every package the library reads."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Fetch the Debian packages of the category library.")
    parser.add_argument("--root", help=f"destination (default ${DEBIAN_DIR_ENV} or {DEFAULT_DEBIAN_DIR})")
    args = parser.parse_args(argv)
    try:
        records = fetch_packages(debian_packages(), Path(args.root) if args.root else None)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, record in sorted(records.items()):
        print(f"{name:<40} {record.get('version', '?')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
