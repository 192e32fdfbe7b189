"""merged_into: an adapter merged into the shared base model in place scores exactly like peft's merge, and
the base model is bit-identical afterwards (so one loaded model serves every evaluation)."""

from __future__ import annotations

import json

import pytest
import torch

from icm_core.infra.io import ArtifactError
from icm_core.lora.adapters import merge_adapter, merged_into, read_adapter, write_adapter
from icm_core.models.base_model import shared_base_model
from tests import helpers


def _adapter(tmp_path, fresh_base, seed: int, name: str):
    from peft import get_peft_model

    from icm_core.lora.adapters import adapter_config_dict, lora_config_for

    model = fresh_base()
    cfg = helpers.lora_config()
    peft_model = get_peft_model(model, lora_config_for(model, cfg, "tiny"))
    state = helpers.random_lora_state(fresh_base(), cfg, seed=seed)
    config = adapter_config_dict(peft_model, str(tmp_path))
    config.pop("base_model_name_or_path")
    return write_adapter(tmp_path / name, {k: 0.05 * v for k, v in state.items()}, config)


def test_merged_into_matches_peft_merge_and_restores(tmp_path, fresh_base):
    first, second = _adapter(tmp_path, fresh_base, 1, "a"), _adapter(tmp_path, fresh_base, 2, "b")
    ids = torch.arange(3, 19).unsqueeze(0)
    base = fresh_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        for folder in (first, second):
            expected = merge_adapter(fresh_base(), folder)(input_ids=ids).logits
            with merged_into(base, folder) as model:
                assert model is base
                got = model(input_ids=ids).logits
            assert torch.allclose(got, expected, atol=1e-5), folder
            assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter changed something
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical afterwards
    with merged_into(base, None) as model:
        assert model is base


def test_merged_into_restores_after_an_error(tmp_path, fresh_base):
    folder = _adapter(tmp_path, fresh_base, 1, "a")
    base = fresh_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), merged_into(base, folder):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_merged_into_rejects_an_adapter_for_another_model(tmp_path, fresh_base):
    folder = _adapter(tmp_path, fresh_base, 1, "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    state = {
        k.replace("layers.1.", "layers.7."): v
        for k, v in __import__("safetensors.torch").torch.load_file(str(folder / "adapter_model.safetensors")).items()
    }
    bad = write_adapter(tmp_path / "bad", state, config)
    with pytest.raises(ArtifactError, match="does not fit this base model"), merged_into(fresh_base(), bad):
        pass
    config["base_model_name_or_path"] = "other-model"
    named = write_adapter(tmp_path / "named", state, config)
    with pytest.raises(ValueError, match="other-model"), merged_into(fresh_base(), named, "tiny"):
        pass


def test_shared_base_model_loads_once(tiny_model_cfg):
    with shared_base_model(tiny_model_cfg) as a:
        pass
    with shared_base_model(tiny_model_cfg) as b:
        assert a is b


def test_merged_into_rejects_weights_of_another_rank(tmp_path, fresh_base):
    folder = _adapter(tmp_path, fresh_base, 1, "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = int(config["r"]) * 2  # the weights are rank r, the config says 2r
    bad = write_adapter(tmp_path / "bad-rank", read_adapter(folder)[0], config)
    base = fresh_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ArtifactError, match="does not fit this base model"), merged_into(base, bad):
        pass
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
