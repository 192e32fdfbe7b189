"""A generated adapter loads in a user's own code, without the project: its ``base_model_name_or_path`` names
a base transformers can load, and ``AutoPeftModelForCausalLM`` loads it in a fresh process (where the venv's
torchvision hook keeps peft importable)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icm_core.data.categories import Category
from icm_core.data.config import DataConfig
from icm_core.data.stages import prepare_data
from icm_core.generator.config import CVAEConfig, SampleConfig, TaskVectorConfig
from icm_core.generator.stages import compute_task_vector, sample_adapter, train_generator_stage
from icm_core.lora.adapters import ADAPTER_CONFIG, check_adapter_base, merge_adapter
from icm_core.lora.stages import finetune_lora
from icm_core.models.base_model import (
    BUILTIN_MODELS,
    adapter_base_reference,
    base_model_names,
    converted_dir,
    load_base_model,
)
from icm_core.models.config import ModelConfig
from tests import helpers


REPO = Path(__file__).resolve().parents[3]
PROBE = torch.arange(1, 17).reshape(1, 16) % 90 + 3  # token ids of the character vocabulary


def fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter of this environment, outside the repository (no project import)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_base_dir) -> dict:
    """The file-based stages on the tiny model: two categories -> one generator -> a generated adapter."""
    root = tmp_path_factory.mktemp("adapter-loading")
    model_cfg = helpers.model_config(tiny_base_dir)
    data_cfg = DataConfig(seq_len=24, min_chars=200)
    lora_cfg = helpers.lora_config(steps=4, trajectory_size=2, checkpoint_every=2, lr=3e-2)
    tv_cfg = TaskVectorConfig(num_samples=2, sample_tokens=16)
    trajectories, vectors = {}, {}
    for name, text in {"prose": helpers.SAMPLE_TEXT, "symbols": helpers.OTHER_TEXT}.items():
        source = root / f"{name}.txt"
        source.write_text("\n\n".join(f"Document {i}. {text}" for i in range(24)))
        category = Category(name=name, source=str(source), description=f"{name} text")
        prepare_data(category, data_cfg, root / "data" / name)
        trajectories[name] = finetune_lora(root / "data" / name, model_cfg, data_cfg, lora_cfg, root / "lora" / name)
        vectors[name] = root / "tv" / f"{name}.safetensors"
        compute_task_vector(
            category, root / "data" / name, root / "lora" / name, model_cfg, data_cfg, tv_cfg, vectors[name]
        )
    generator = root / "generator" / "generator.safetensors"
    cvae = CVAEConfig(channels=(4, 8, 8, 4), latent_dim=8, epochs=2, batch_size=2)
    train_generator_stage({n: t["folder"] for n, t in trajectories.items()}, vectors, cvae, generator)
    adapter = root / "generated" / "adapter"
    sample_adapter(generator, adapter, SampleConfig(seed=0), category="prose")
    merged = merge_adapter(load_base_model(model_cfg), adapter, base_model_names(model_cfg))
    with torch.no_grad():
        logits = merged(PROBE).logits
    return {"root": root, "model_cfg": model_cfg, "generator": generator, "adapter": adapter, "logits": logits}


def test_adapter_names_a_base_that_transformers_can_load(generated, tiny_base_dir):
    config = json.loads((generated["adapter"] / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_base_dir.resolve())
    assert (Path(config["base_model_name_or_path"]) / "config.json").is_file()


@pytest.mark.slow
def test_auto_peft_model_loads_a_generated_adapter_in_a_fresh_process(generated, tmp_path):
    torch.save(generated["logits"], tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(generated['adapter'])!r}).eval()\n"
        f"probe = torch.arange(1, 17).reshape(1, 16) % 90 + 3\n"
        "with torch.no_grad():\n"
        "    logits = model(probe).logits\n"
        "expected = torch.load('expected.pt')\n"
        "print('MAXDIFF', float((logits - expected).abs().max()))\n"
        "print('PROJECT', sorted(m for m in sys.modules if m.split('.')[0] in ('icm_core', 'tasks', 'flows')))\n"
    )
    result = fresh_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("MAXDIFF", "PROJECT")))
    assert float(lines["MAXDIFF"]) < 1e-4  # the same merged weights as the project's own loader
    assert lines["PROJECT"] == "[]"


@pytest.mark.slow
def test_plain_peft_and_transformers_imports_work_without_the_project(tmp_path):
    """The make-built venv has torchvision (vision extra), a CUDA build next to the CPU torch: its start-up
    hook (icm_lora_torchvision.pth) must keep these imports working in any script."""
    code = (
        "import sys\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "import torchvision\n"
        "print('OK', 'icm_core' in sys.modules)\n"
    )
    result = fresh_python(code, tmp_path)
    assert result.returncode == 0, (
        "plain `from peft import PeftModel` fails in this environment; `make install` writes the torchvision "
        "hook (icm_core.models.torchvision_compat.install_pth()):\n" + result.stderr[-2000:]
    )
    assert result.stdout.split()[-2:] == ["OK", "False"]


@pytest.mark.slow
def test_the_hook_imports_nothing_until_torchvision_is_imported(tmp_path):
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torchvision') is not None\n"  # transformers' availability check
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    result = fresh_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["TORCH", "False"]


def test_adapter_base_reference(tmp_path, tiny_base_dir):
    alias = ModelConfig(cache_dir=tmp_path / "models")
    # The built-in alias's converted folder (named by the GGUF's, the conversion code's and transformers' identity).
    folder = converted_dir(alias)
    assert folder.parent == tmp_path / "models" and folder.name.startswith(BUILTIN_MODELS["smollm2-135m"][2] + "-")
    assert adapter_base_reference(alias) == str(folder.resolve())
    assert base_model_names(alias) == ("smollm2-135m", str(folder.resolve()))
    hub_id = "meta-llama/Meta-Llama-3-8B"
    assert adapter_base_reference(ModelConfig(name_or_path=hub_id)) == hub_id
    assert adapter_base_reference(ModelConfig(name_or_path=str(tiny_base_dir))) == str(tiny_base_dir.resolve())
    hub = ModelConfig(adapter_base="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert adapter_base_reference(hub) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "smollm2-135m" in base_model_names(hub)


def test_adapters_recorded_under_any_name_of_the_base_are_accepted(tmp_path):
    names = ("smollm2-135m", "/models/smollm2-135m-instruct")
    for made_for in (*names, None):
        check_adapter_base({"base_model_name_or_path": made_for}, names, tmp_path)
    with pytest.raises(ValueError, match="other/model"):
        check_adapter_base({"base_model_name_or_path": "other/model"}, names, tmp_path)


def test_generate_can_name_another_base(generated, tmp_path):
    out = tmp_path / "published"
    sample_adapter(generated["generator"], out, SampleConfig(seed=0), category="prose", base_model="org/model")
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "org/model"
