"""Safe loading: weights only from safetensors, no pickle loads anywhere, no model code run unless asked."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from icm_core.generator.config import TaskVectorConfig
from icm_core.infra.io import ArtifactError, load_tensors
from icm_core.models.base_model import load_base_model
from icm_core.models.config import ModelConfig
from icm_core.models.identity import ModelLoadError


REPO = Path(__file__).resolve().parents[3]
SOURCES = sorted(p for folder in ("icm_core", "tasks", "flows", "scripts") for p in (REPO / folder).rglob("*.py"))


def calls(tree: ast.AST, attribute: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == attribute:
                yield node


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_sources_were_found():
    assert len(SOURCES) > 20 and any(p.name == "io.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_pickle_loading_in_the_code(path):
    """torch.load only with weights_only=True; no pickle.load / pickle.loads / numpy allow_pickle at all."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for call in calls(tree, "load"):
        func = call.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        if owner == "torch":
            flag = keyword(call, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, (
                f"{path}:{call.lineno}: torch.load without weights_only=True"
            )
        assert owner not in ("pickle", "cloudpickle", "dill", "joblib"), f"{path}:{call.lineno}: {owner}.load"
    for call in calls(tree, "loads"):
        func = call.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        assert owner not in ("pickle", "cloudpickle", "dill"), f"{path}:{call.lineno}: {owner}.loads"
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            assert isinstance(node.value, ast.Constant) and node.value.value is False, f"{path}: allow_pickle"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_remote_code_is_never_switched_on_in_the_code(path):
    """Every ``trust_remote_code=`` passes the user's setting (or False), never a literal True."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), f"{path}: {node.lineno}"


def test_model_loaders_pass_the_users_setting():
    """Both base-model loaders hand ModelConfig.trust_remote_code to from_pretrained (default False)."""
    assert ModelConfig().trust_remote_code is False
    tree = ast.parse((REPO / "icm_core" / "models" / "base_model.py").read_text())
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    for name in ("load_tokenizer", "load_base_model"):
        [call] = list(calls(functions[name], "from_pretrained"))
        assert ast.unparse(keyword(call, "trust_remote_code")) == "cfg.trust_remote_code", name


def test_text_encoder_gets_the_users_setting():
    """The description task vector's sentence encoder gets TaskVectorConfig.text_encoder_trust_remote_code
    (default False), and TextEncoder hands it to both from_pretrained calls."""
    assert TaskVectorConfig().text_encoder_trust_remote_code is False
    stages_tree = ast.parse((REPO / "icm_core" / "generator" / "stages.py").read_text())
    [call] = [
        node
        for node in ast.walk(stages_tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "TextEncoder"
    ]
    assert ast.unparse(keyword(call, "trust_remote_code")) == "tv_cfg.text_encoder_trust_remote_code"
    encoder_tree = ast.parse((REPO / "icm_core" / "generator" / "task_vectors.py").read_text())
    [init] = [n for n in ast.walk(encoder_tree) if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    loads = list(calls(init, "from_pretrained"))
    assert len(loads) == 2
    assert all(ast.unparse(keyword(c, "trust_remote_code")) == "trust_remote_code" for c in loads)


def remote_code_model(tiny_base_dir: Path, folder: Path, model_type: str | None = None) -> tuple[Path, Path]:
    """A copy of the tiny model whose config asks to run the folder's own Python (``auto_map``); that code
    writes a marker file when it is imported. Returns (folder, marker)."""
    import shutil

    folder = shutil.copytree(tiny_base_dir, folder)
    ran = folder.parent / f"{folder.name}-code-ran"
    code = f"from pathlib import Path\nPath({str(ran)!r}).write_text('ran')\n"
    (folder / "configuration_evil.py").write_text(code + "from transformers import LlamaConfig as EvilConfig\n")
    (folder / "modeling_evil.py").write_text(code + "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    if model_type:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    return folder, ran


def test_model_code_of_a_known_architecture_is_not_run(tiny_base_dir, tmp_path):
    """A known architecture that also ships its own code loads with transformers' built-in class; the
    folder's code is not imported."""
    folder, ran = remote_code_model(tiny_base_dir, tmp_path / "model")
    model = load_base_model(ModelConfig(name_or_path=str(folder), device="cpu"))
    assert type(model).__module__.startswith("transformers.models.llama")
    assert not ran.exists(), "the model folder's own code was executed"


def test_model_that_needs_its_own_code_is_refused(tiny_base_dir, tmp_path):
    """An architecture only the folder's code defines is refused, naming the model and the setting."""
    folder, ran = remote_code_model(tiny_base_dir, tmp_path / "model", model_type="evil_lm")
    with pytest.raises(ModelLoadError, match="trust_remote_code") as info:
        load_base_model(ModelConfig(name_or_path=str(folder), device="cpu"))
    assert str(folder) in str(info.value)
    assert not ran.exists(), "the model folder's own code was executed"


def test_pickle_is_refused_before_any_loader(tmp_path, monkeypatch):
    """A pickle named .safetensors is refused by its first bytes; torch.load is never called on it."""
    path = tmp_path / "weights.safetensors"
    torch.save({"w": torch.zeros(3)}, path)

    def forbidden(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("torch.load was called on a user file")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ArtifactError, match="pickle") as info:
        load_tensors(path, verify=False)
    assert str(path) in str(info.value)
