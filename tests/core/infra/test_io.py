"""Tests of icm_core.infra.io: safetensors + sidecar artifacts, sha256 verification, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from icm_core.infra.io import (
    ArtifactError,
    atomic_write,
    check_safetensors_file,
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
    sidecar_path,
    verify_file,
    write_json,
)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=generator),
        "b.weight": torch.arange(10, dtype=torch.int64),
        "c": torch.randn(7, generator=generator).to(torch.bfloat16),
    }


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_round_trip_with_sidecar(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = _tensors()
    digest = save_tensors(path, tensors, {"step": 3, "note": "hi"})
    side = sidecar_path(path)
    assert side == tmp_path / "x.json"
    sidecar = json.loads(side.read_text())
    assert sidecar["sha256"] == digest == sha256_file(path)
    assert sidecar["file"] == "x.safetensors"
    assert len(digest) == 64
    loaded, meta = load_tensors(path)
    assert meta == {"step": 3, "note": "hi"}
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor)
    assert verify_file(path) == digest
    assert _temp_files(tmp_path) == []


def test_non_contiguous_tensor_is_saved(tmp_path):
    path = tmp_path / "t.safetensors"
    tensor = torch.arange(12.0).view(3, 4).t()
    save_tensors(path, {"t": tensor})
    assert torch.equal(load_tensors(path)[0]["t"], tensor)


def test_corrupted_byte_is_detected(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, _tensors())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a byte inside the tensor data: still a readable safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch") as info:
        load_tensors(path)
    assert str(path) in str(info.value)
    with pytest.raises(ArtifactError, match="corrupted"):
        verify_file(path)


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, _tensors())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(ArtifactError) as info:
        load_tensors(path)
    assert str(path) in str(info.value)
    # Even without the sha check, a truncated file is refused rather than half-read.
    with pytest.raises(ArtifactError) as info:
        load_tensors(path, verify=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0, 5, 20])
def test_truncated_header_is_detected(tmp_path, keep):
    path = tmp_path / "x.safetensors"
    save_tensors(path, _tensors())
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ArtifactError) as info:
        check_safetensors_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(ArtifactError):
        load_tensors(path, verify=False)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_file_is_refused(tmp_path, zip_format):
    path = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(2)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ArtifactError, match="pickle") as info:
        check_safetensors_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(ArtifactError, match="pickle"):
        load_tensors(path, verify=False)


def test_missing_file_and_missing_sidecar(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_tensors(tmp_path / "nope.safetensors")
    path = tmp_path / "x.safetensors"
    save_tensors(path, _tensors())
    sidecar_path(path).unlink()
    with pytest.raises(ArtifactError, match="x.json"):
        load_tensors(path)
    tensors, meta = load_tensors(path, verify=False)
    assert meta == {} and set(tensors) == set(_tensors())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused(tmp_path, bad):
    path = tmp_path / "x.safetensors"
    tensor = torch.zeros(4)
    tensor[2] = bad
    with pytest.raises(ArtifactError, match="NaN or Inf") as info:
        save_tensors(path, {"w": tensor})
    assert "'w'" in str(info.value)
    assert not path.exists() and not sidecar_path(path).exists()
    assert _temp_files(tmp_path) == []


def test_nan_does_not_replace_existing_artifact(tmp_path):
    path = tmp_path / "x.safetensors"
    digest = save_tensors(path, {"w": torch.ones(3)})
    with pytest.raises(ArtifactError):
        save_tensors(path, {"w": torch.full((3,), float("nan"))})
    assert verify_file(path) == digest


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old contents")

    def writer(tmp: Path) -> None:
        tmp.write_text("half of the new cont")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, writer)
    assert path.read_text() == "old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_write_success_replaces_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write(path, lambda tmp: tmp.write_text("one"))
    atomic_write(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_write_json_is_deterministic_and_read_json_checks(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json(a, {"z": 1, "a": [1, 2], "p": Path("x/y"), "t": (1, 2)})
    write_json(b, {"t": (1, 2), "p": Path("x/y"), "a": [1, 2], "z": 1})
    assert a.read_bytes() == b.read_bytes()
    assert read_json(a) == {"a": [1, 2], "p": "x/y", "t": [1, 2], "z": 1}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArtifactError, match="bad.json"):
        read_json(bad)
    with pytest.raises(ArtifactError, match="not found"):
        read_json(tmp_path / "missing.json")


def test_safetensors_whose_header_length_starts_like_a_pickle_is_accepted(tmp_path):
    # A header of 0x80 + 256k bytes makes the file's first byte 0x80, a pickle's first byte too.
    import struct

    path = tmp_path / "t.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x180 - len(header))
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.5))
    assert path.read_bytes()[0] == 0x80
    tensors, _ = load_tensors(path, verify=False)
    assert tensors["x"].item() == 1.5
