"""Where a deployment run's path parameters may point: local folders resolved, URLs by prefix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from icm_core.infra.confinement import (
    ConfinementError,
    confine,
    is_inside,
    parse_places,
    place,
    refuse_remote_code,
    remote_code_fields,
)


def test_local_paths_inside_and_outside(tmp_path: Path):
    root = tmp_path / "artifacts"
    root.mkdir()
    assert is_inside(root, [root])
    assert is_inside(root / "a" / "b", [root])  # need not exist yet
    assert is_inside(str(root) + "/", [root])
    assert not is_inside(tmp_path, [root])
    assert not is_inside(tmp_path / "artifacts-evil", [root])  # a sibling sharing the prefix
    assert not is_inside(root / ".." / "elsewhere", [root])
    assert not is_inside("/etc/passwd", [root])


def test_relative_paths_start_from_base(tmp_path: Path):
    checkout = tmp_path / "checkout"
    (checkout / "artifacts").mkdir(parents=True)
    assert is_inside("artifacts", ["artifacts"], base=checkout)
    assert is_inside("artifacts/detection", [checkout / "artifacts"], base=checkout)
    assert not is_inside("../artifacts", [checkout / "artifacts"], base=checkout)
    assert not is_inside("artifacts/../../x", ["artifacts"], base=checkout)


def test_symlinks_are_followed(tmp_path: Path):
    root, outside = tmp_path / "artifacts", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert not is_inside(root / "link", [root])
    assert not is_inside(root / "link" / "new" / "folder", [root])
    os.symlink(root, tmp_path / "alias")
    assert is_inside(tmp_path / "alias" / "x", [root])  # a link into the root is the root


def test_urls_by_prefix_with_a_separator():
    allowed = ["s3://bucket/icm", "memory://shared/"]
    assert is_inside("s3://bucket/icm", allowed)
    assert is_inside("s3://bucket/icm/", allowed)
    assert is_inside("s3://bucket/icm/run-1", allowed)
    assert is_inside("S3://bucket//icm/run-1", allowed)  # scheme case and doubled slashes do not matter
    assert is_inside("memory://shared/x", allowed)
    assert not is_inside("s3://bucket/icm-evil", allowed)
    assert not is_inside("s3://bucket", allowed)
    assert not is_inside("s3://bucket/icm/../other", allowed)
    assert not is_inside("s3://bucket/icm/../../../etc", allowed)
    assert not is_inside("gcs://bucket/icm/x", allowed)  # another filesystem
    assert not is_inside("simplecache::s3://bucket/icm/x", allowed)  # a chained URL is not the listed one
    assert is_inside("s3://bucket/x", ["s3://bucket"])
    assert not is_inside("s3://bucket-evil/x", ["s3://bucket"])


def test_a_local_folder_never_matches_a_url_and_back(tmp_path: Path):
    assert not is_inside(tmp_path / "s3:" / "bucket", ["s3://bucket"])
    assert not is_inside("s3://bucket/x", [tmp_path])
    assert is_inside(f"file://{tmp_path}/x", [tmp_path])  # file:// is a local path
    assert not is_inside(f"file://{tmp_path}/../x", [tmp_path])


def test_place_normalizes(tmp_path: Path):
    assert place("s3://Bucket/a/./b/../c/") == "s3://Bucket/a/c"
    assert place(tmp_path / "a" / ".." / "b") == str(tmp_path.resolve() / "b")
    with pytest.raises(ConfinementError, match="without a bucket"):
        place("s3://")


def test_parse_places():
    assert parse_places(None, ["/x"]) == ["/x"]
    assert parse_places("  ", [Path("/x")]) == ["/x"]
    assert parse_places("/a, s3://b/c ,,", ["/x"]) == ["/a", "s3://b/c"]


def test_confine_names_the_parameter_and_the_allowed_places(tmp_path: Path):
    root = tmp_path / "artifacts"
    confine("root", root / "x", [root], "$ICM_ALLOWED_ROOTS")
    confine("out", None, [root], "inside root")  # not given: nothing to check
    with pytest.raises(ConfinementError) as caught:
        confine("root", "/etc", [root, "s3://bucket/icm"], "$ICM_ALLOWED_ROOTS")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("root: '/etc' is outside")
    assert str(root.resolve()) in message and "s3://bucket/icm" in message and "$ICM_ALLOWED_ROOTS" in message


def test_remote_code_fields_are_found_at_any_depth():
    from icm_core.config import RunConfig

    tree = RunConfig().model_dump(mode="json")
    assert remote_code_fields(tree) == []
    refuse_remote_code(tree)  # the defaults pass
    tree["model"]["trust_remote_code"] = True
    tree["task_vector"]["text_encoder_trust_remote_code"] = True
    assert remote_code_fields(tree) == [
        "config.model.trust_remote_code",
        "config.task_vector.text_encoder_trust_remote_code",
    ]
    assert remote_code_fields({"tasks": [{"trust_remote_code": True}]}, "x") == ["x.tasks[0].trust_remote_code"]
    assert remote_code_fields({"trust_remote_code": "yes"}) == []  # only a real true
    with pytest.raises(ConfinementError, match=r"^config\.model\.trust_remote_code: .*ICM_ALLOW_REMOTE_CODE=1"):
        refuse_remote_code(tree)
