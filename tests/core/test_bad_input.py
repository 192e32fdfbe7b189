"""Bad input through the ``icm-lora`` command line: a clear error naming the file or field, exit status 2, and
nothing written. One row per case; docs/reliability.md shows the same table.

A module fixture builds real, small inputs through the same command line (two categories' splits, their
LoRA trajectories, task vectors and a generator on the tiny model); each case then spoils one input.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from icm_core.cli import main
from icm_core.infra.io import sha256_file, sidecar_path


REPO = Path(__file__).resolve().parents[2]
PARAGRAPH = (
    "Paragraph {i}. The quick brown fox jumps over the lazy dog while the river runs past the mill, and the "
    "miller counts {n} sacks of flour before the evening bell. Rain fell on the quiet town; the bridge held.\n\n"
)


def category_text(seed: int) -> str:
    return "".join(PARAGRAPH.format(i=i, n=seed * 100 + 7 * i) for i in range(12))


@dataclass
class Inputs:
    """Valid inputs built once; cases copy and spoil them."""

    folder: Path
    config: Path
    categories: Path
    data: Path
    lora: Path
    lora_rank4: Path
    lora_q_only: Path
    task_vector: Path
    generator: Path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_base_dir) -> Inputs:
    folder = tmp_path_factory.mktemp("bad-input")
    config = folder / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_base_dir), "device": "cpu", "num_threads": 1},
                "data": {"seq_len": 32, "min_chars": 500},
                "lora": {"rank": 2, "dropout": 0.0, "last_n_layers": None, "steps": 4, "batch_size": 2,
                         "lr": 0.01, "warmup_steps": 0, "trajectory_size": 2, "checkpoint_every": 2},
                "task_vector": {"num_samples": 2, "sample_tokens": 16},
                "cvae": {"channels": [4, 8, 8, 4], "latent_dim": 8, "epochs": 2, "batch_size": 2},
                "eval": {"max_tokens": 64},
            }
        )
    )  # fmt: skip
    texts = {"mill": category_text(1), "river": category_text(2)}
    entries = []
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        entries.append({"name": name, "description": f"{name} text", "source": f"{name}.txt"})
    categories = folder / "categories.yaml"
    categories.write_text(yaml.safe_dump({"categories": entries}))

    import contextlib
    import io

    def ok(argv: list[str]) -> None:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(argv)
        assert code == 0, f"{argv}: {err.getvalue()}"

    common = ["--config", str(config), "--categories", str(categories)]
    for name in texts:
        ok(["prepare-data", *common, "--category", name, "--out", str(folder / "data" / name)])
        ok(["finetune", *common, "--data", str(folder / "data" / name), "--out", str(folder / "lora" / name)])
        ok(
            ["task-vector", *common, "--category", name, "--data", str(folder / "data" / name)]
            + ["--lora", str(folder / "lora" / name), "--out", str(folder / "tv" / f"{name}.safetensors")]
        )
    data = folder / "data" / "mill"
    ok(["finetune", *common, "--set", "lora.rank=4", "--data", str(data), "--out", str(folder / "lora-r4")])
    only_q = ["--set", "lora.target_modules=[q_proj]"]
    ok(["finetune", *common, *only_q, "--data", str(data), "--out", str(folder / "lora-q")])
    pairs = []
    for name in texts:
        pairs += ["--lora", f"{name}={folder / 'lora' / name}"]
        pairs += ["--task-vector", f"{name}={folder / 'tv' / name}.safetensors"]
    ok(["train-generator", *common, *pairs, "--out", str(folder / "generator.safetensors")])
    return Inputs(
        folder, config, categories, data, folder / "lora" / "mill", folder / "lora-r4", folder / "lora-q",
        folder / "tv" / "mill.safetensors", folder / "generator.safetensors",
    )  # fmt: skip


# ---- helpers that spoil one input --------------------------------------------------------------------


def write_categories(folder: Path, entries: list[dict], texts: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (texts or {}).items():
        (folder / name).write_bytes(data)
    path = folder / "categories.yaml"
    path.write_text(yaml.safe_dump({"categories": entries}))
    return path


def replace_checkpoint(trajectory: Path, index: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Overwrite checkpoint ``index`` of a trajectory with ``tensors`` and make every hash agree, so only the
    content check can catch it."""
    meta = json.loads((trajectory / "trajectory.json").read_text())
    path = trajectory / meta["files"][index]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    digest = sha256_file(path)
    sidecar = json.loads(sidecar_path(path).read_text())
    sidecar["sha256"] = digest
    sidecar_path(path).write_text(json.dumps(sidecar))
    meta["sha256"][index] = digest
    (trajectory / "trajectory.json").write_text(json.dumps(meta))
    return path


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def train_generator_args(inputs: Inputs, lora: Path, out: Path) -> list[str]:
    return [
        "train-generator", "--config", str(inputs.config),
        "--lora", f"mill={lora}", "--task-vector", f"mill={inputs.task_vector}",
        "--lora", f"river={inputs.folder / 'lora' / 'river'}",
        "--task-vector", f"river={inputs.folder / 'tv' / 'river.safetensors'}",
        "--out", str(out),
    ]  # fmt: skip


def evaluate_args(inputs: Inputs, adapter: Path, out: Path) -> list[str]:
    return ["evaluate", "--config", str(inputs.config), "--data", str(inputs.data), "--adapter", str(adapter)] + [
        "--out",
        str(out),
    ]


def sample_args(inputs: Inputs, vector: Path, out: Path, generator: Path | None = None) -> list[str]:
    return ["sample", "--config", str(inputs.config), "--generator", str(generator or inputs.generator)] + [
        "--task-vector",
        str(vector),
        "--out",
        str(out),
    ]


# ---- the cases ---------------------------------------------------------------------------------------
# Each builder gets (inputs, tmp) and returns (argv, strings the error must contain, paths that must not exist).

Case = Callable[[Inputs, Path], tuple[list[str], list[str], list[Path]]]


def unknown_model_id(inputs, tmp):
    out = tmp / "out"
    argv = ["finetune", "--config", str(inputs.config), "--set", "model.name_or_path=no-such-org/no-such-model"]
    return (
        argv + ["--data", str(inputs.data), "--out", str(out)],
        ["'no-such-org/no-such-model'", "cannot load"],
        [out],
    )


def model_path_not_a_model(inputs, tmp):
    (tmp / "not-a-model").mkdir()
    out = tmp / "out"
    argv = ["finetune", "--config", str(inputs.config), "--set", f"model.name_or_path={tmp / 'not-a-model'}"]
    return argv + ["--data", str(inputs.data), "--out", str(out)], [str(tmp / "not-a-model"), "config.json"], [out]


def _prepare(inputs, tmp, entries, texts, category):
    cats = write_categories(tmp / "cats", entries, texts)
    out = tmp / "out"
    argv = ["prepare-data", "--config", str(inputs.config), "--categories", str(cats), "--category", category]
    return argv + ["--out", str(out)], cats, out


def empty_category_text(inputs, tmp):
    entries = [{"name": "blank", "description": "d", "source": "blank.txt"}]
    argv, _, out = _prepare(inputs, tmp, entries, {"blank.txt": b"  \n\n \n"}, "blank")
    return argv, ["'blank'", str(tmp / "cats" / "blank.txt"), "empty"], [out]


def too_little_text(inputs, tmp):
    entries = [{"name": "short", "description": "d", "source": "short.txt"}]
    argv, _, out = _prepare(inputs, tmp, entries, {"short.txt": b"Two short lines.\n\nThat is all.\n"}, "short")
    return argv, ["'short'", "has only", "at least 500", str(tmp / "cats" / "short.txt")], [out]


def duplicate_category_names(inputs, tmp):
    entries = [{"name": "mill", "description": "d", "source": "a.txt"}] * 2
    cats = write_categories(tmp / "cats", entries, {"a.txt": category_text(3).encode()})
    return ["categories", "--categories", str(cats)], [str(cats), "categories[1]", "duplicate", "'mill'"], []


def _bad_name(name: str) -> Case:
    def case(inputs, tmp):
        entries = [{"name": name, "description": "d", "source": "a.txt"}]
        cats = write_categories(tmp / "cats", entries, {"a.txt": category_text(3).encode()})
        return ["categories", "--categories", str(cats)], [str(cats), "categories[0]", "name", "path separators"], []

    return case


def non_utf8_text(inputs, tmp):
    entries = [{"name": "latin", "description": "d", "source": "latin.txt"}]
    text = category_text(4).encode() + "caf\xe9 cr\xe8me\n".encode("latin-1")
    argv, _, out = _prepare(inputs, tmp, entries, {"latin.txt": text}, "latin")
    return argv, [str(tmp / "cats" / "latin.txt"), "not valid UTF-8", "byte offset"], [out]


def checkpoints_with_different_ranks(inputs, tmp):
    lora = copy_tree(inputs.lora, tmp / "lora")
    other = load_file(str(sorted(inputs.lora_rank4.glob("checkpoint-*.safetensors"))[-1]))
    path = replace_checkpoint(lora, 1, other)
    out = tmp / "generator.safetensors"
    return train_generator_args(inputs, lora, out), [str(path), "'mill' checkpoint 1", "different LoRA ranks"], [out]


def checkpoints_with_different_target_modules(inputs, tmp):
    lora = copy_tree(inputs.lora, tmp / "lora")
    other = load_file(str(sorted(inputs.lora_q_only.glob("checkpoint-*.safetensors"))[-1]))
    path = replace_checkpoint(lora, 1, other)
    out = tmp / "generator.safetensors"
    return train_generator_args(inputs, lora, out), [str(path), "different target modules"], [out]


def nan_in_checkpoint(inputs, tmp):
    lora = copy_tree(inputs.lora, tmp / "lora")
    tensors = load_file(str(sorted(lora.glob("checkpoint-*.safetensors"))[0]))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    path = replace_checkpoint(lora, 0, tensors)
    out = tmp / "generator.safetensors"
    return train_generator_args(inputs, lora, out), [str(path), key, "NaN or Inf"], [out]


def inf_in_adapter(inputs, tmp):
    adapter = copy_tree(inputs.lora / "adapter", tmp / "adapter")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(weights))
    out = tmp / "metrics.json"
    return evaluate_args(inputs, adapter, out), [str(weights), key, "NaN or Inf"], [out]


def nan_task_vector(inputs, tmp):
    vector = tmp / "nan.safetensors"
    save_file({"task_vector": torch.full((helpers_hidden(),), float("nan"))}, str(vector))
    out = tmp / "adapter"
    return sample_args(inputs, vector, out), [str(vector), "NaN or Inf"], [out]


def helpers_hidden() -> int:
    from tests.helpers import HIDDEN

    return HIDDEN


def task_vector_wrong_dimension(inputs, tmp):
    vector = tmp / "small.safetensors"
    save_file({"task_vector": torch.ones(7)}, str(vector))
    out = tmp / "adapter"
    return sample_args(inputs, vector, out), [str(vector), "shape (7,)", f"expects ({helpers_hidden()},)"], [out]


def adapter_for_another_base_model(inputs, tmp):
    adapter = copy_tree(inputs.lora / "adapter", tmp / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Meta-Llama-3-8B"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp / "metrics.json"
    return evaluate_args(inputs, adapter, out), [str(adapter), "'meta-llama/Meta-Llama-3-8B'"], [out]


def adapter_that_does_not_fit(inputs, tmp):
    # Same base id, but weights shaped for another model (rank-4 B matrices under a rank-2 config).
    adapter = copy_tree(inputs.lora / "adapter", tmp / "adapter")
    shutil.copy(inputs.lora_rank4 / "adapter" / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    out = tmp / "metrics.json"
    return evaluate_args(inputs, adapter, out), [str(adapter), "does not fit this base model"], [out]


def config_unknown_field(inputs, tmp):
    return ["config", "--config", str(inputs.config), "--set", "lora.rnak=4"], ["lora.rnak", "Extra inputs"], []


def config_unknown_field_in_file(inputs, tmp):
    path = tmp / "run.yaml"
    path.write_text("cvae:\n  latnt_dim: 3\n")
    return ["config", "--config", str(path)], [str(path), "cvae.latnt_dim"], []


def config_unknown_section(inputs, tmp):
    path = tmp / "run.yaml"
    path.write_text("optimiser:\n  lr: 0.1\n")
    return ["config", "--config", str(path)], [str(path), "optimiser"], []


def config_out_of_range(inputs, tmp):
    return ["config", "--set", "lora.rank=0", "--set", "data.val_fraction=0.7"], ["lora.rank", "data.val_fraction"], []


def config_wrong_type(inputs, tmp):
    return ["config", "--set", "cvae.epochs=many"], ["cvae.epochs", "integer"], []


def pickle_task_vector(inputs, tmp):
    vector = tmp / "vector.safetensors"
    torch.save({"task_vector": torch.ones(helpers_hidden())}, vector)
    out = tmp / "adapter"
    return sample_args(inputs, vector, out), [str(vector), "pickle"], [out]


def pickle_generator(inputs, tmp):
    generator = tmp / "generator.safetensors"
    torch.save({"cvae.x": torch.ones(3)}, generator)
    out = tmp / "adapter"
    argv = ["sample", "--config", str(inputs.config), "--generator", str(generator), "--category", "mill"]
    return argv + ["--out", str(out)], [str(generator), "pickle"], [out]


def pickle_checkpoint(inputs, tmp):
    lora = copy_tree(inputs.lora, tmp / "lora")
    path = sorted(lora.glob("checkpoint-*.safetensors"))[0]
    torch.save(load_file(str(path)), path)
    out = tmp / "generator.safetensors"
    # The trajectory index holds the checkpoint's sha256: the swap is caught as corruption, before any loader.
    return train_generator_args(inputs, lora, out), [str(path), "sha256 mismatch"], [out]


def pickle_adapter_bin(inputs, tmp):
    adapter = copy_tree(inputs.lora / "adapter", tmp / "adapter")
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), adapter / "adapter_model.bin")
    weights.unlink()
    out = tmp / "metrics.json"
    return evaluate_args(inputs, adapter, out), [str(adapter / "adapter_model.bin"), "pickle"], [out]


def pickle_under_safetensors_name(inputs, tmp):
    adapter = copy_tree(inputs.lora / "adapter", tmp / "adapter")
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), weights)
    out = tmp / "metrics.json"
    return evaluate_args(inputs, adapter, out), [str(weights), "pickle"], [out]


def truncated_generator(inputs, tmp):
    generator = tmp / "generator.safetensors"
    shutil.copy(inputs.generator, generator)
    shutil.copy(sidecar_path(inputs.generator), sidecar_path(generator))
    data = generator.read_bytes()
    generator.write_bytes(data[: len(data) // 2])
    out = tmp / "adapter"
    argv = ["sample", "--config", str(inputs.config), "--generator", str(generator), "--category", "mill"]
    return argv + ["--out", str(out)], [str(generator)], [out]


def unknown_category(inputs, tmp):
    out = tmp / "adapter"
    argv = ["sample", "--config", str(inputs.config), "--generator", str(inputs.generator), "--category", "../mill"]
    return argv + ["--out", str(out)], ["category '../mill' is not known to this generator"], [out]


CASES: dict[str, Case] = {
    "unknown-model-id": unknown_model_id,
    "model-path-not-a-model": model_path_not_a_model,
    "empty-category-text": empty_category_text,
    "too-little-text": too_little_text,
    "duplicate-category-names": duplicate_category_names,
    "name-with-slash": _bad_name("news/2024"),
    "name-with-backslash": _bad_name("a\\b"),
    "name-dotdot": _bad_name(".."),
    "name-dotdot-path": _bad_name("../evil"),
    "non-utf8-text": non_utf8_text,
    "checkpoints-different-ranks": checkpoints_with_different_ranks,
    "checkpoints-different-target-modules": checkpoints_with_different_target_modules,
    "nan-in-checkpoint": nan_in_checkpoint,
    "inf-in-adapter": inf_in_adapter,
    "nan-task-vector": nan_task_vector,
    "task-vector-wrong-dimension": task_vector_wrong_dimension,
    "adapter-for-another-base-model": adapter_for_another_base_model,
    "adapter-that-does-not-fit": adapter_that_does_not_fit,
    "config-unknown-field": config_unknown_field,
    "config-unknown-field-in-file": config_unknown_field_in_file,
    "config-unknown-section": config_unknown_section,
    "config-out-of-range": config_out_of_range,
    "config-wrong-type": config_wrong_type,
    "pickle-task-vector": pickle_task_vector,
    "pickle-generator": pickle_generator,
    "pickle-checkpoint": pickle_checkpoint,
    "pickle-adapter-bin": pickle_adapter_bin,
    "pickle-under-safetensors-name": pickle_under_safetensors_name,
    "truncated-generator": truncated_generator,
    "unknown-category": unknown_category,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly(case, inputs, tmp_path, capsys):
    argv, mentions, not_written = CASES[case](inputs, tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (case, code, err)
    assert err.startswith(f"icm-lora {argv[0]}: error: "), err
    for text in mentions:
        assert text in err, f"{case}: {text!r} not in the error:\n{err}"
    assert "Traceback" not in err and out == ""
    for path in not_written:
        assert not path.exists(), f"{case}: {path} was written"
    # No temporary file of an aborted write is left next to the outputs either.
    assert not [p for p in tmp_path.rglob(".*") if p.suffix == ".tmp"]


@pytest.mark.slow
def test_exit_status_reaches_the_shell(tmp_path):
    """The same errors through a real ``python -m icm_core`` process: status 2 and the message on stderr."""
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  rnak: 4\n")
    result = subprocess.run(
        [sys.executable, "-m", "icm_core", "config", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert str(path) in result.stderr and "lora.rnak" in result.stderr
    assert result.stdout == ""
