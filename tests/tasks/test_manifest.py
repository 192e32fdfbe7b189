"""Tests of tasks.manifest: stage output manifests, checked by stat unless a full check is asked for."""

from __future__ import annotations

import pytest

from icm_core.infra.io import HASHED, ArtifactError
from tasks.manifest import VERIFY_ENV, valid_output, verify_manifest, write_manifest


def test_manifest_checks_are_stat_only_unless_full(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x" * 100_000)
    write_manifest(folder, {})
    before = HASHED["bytes"]
    for _ in range(3):
        assert valid_output(folder) is not None
    assert HASHED["bytes"] == before  # O(files) stats, O(0) bytes

    path = folder / "weights.bin"
    st = path.stat()
    path.write_bytes(b"y" * 100_000)
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: a quick check cannot tell
    assert valid_output(folder) is not None
    monkeypatch.setenv(VERIFY_ENV, "full")
    assert valid_output(folder) is None
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        verify_manifest(folder)
    monkeypatch.delenv(VERIFY_ENV)
    path.write_bytes(b"z" * 100_000)  # a normal write changes the mtime: caught without a full check
    assert valid_output(folder) is None
