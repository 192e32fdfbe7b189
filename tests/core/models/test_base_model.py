"""How the base model loads: straight onto the configured device (``device_map``), only from safetensors
(``use_safetensors=True``: a folder with pickled weights only is refused), and never on a missing device."""

from __future__ import annotations

import pytest
import torch

from icm_core.models.base_model import DeviceError, load_base_model
from icm_core.models.identity import ModelLoadError
from tests import helpers


def test_loads_onto_the_device_from_safetensors(tiny_base_dir):
    model = load_base_model(helpers.model_config(tiny_base_dir))
    assert not model.training
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_pickled_weights_only_are_refused(tmp_path):
    folder = tmp_path / "bin-only"
    model = helpers.tiny_model()
    model.config.save_pretrained(folder)  # transformers 5 writes only safetensors: write the pickle by hand
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    helpers.tiny_tokenizer().save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match=str(folder)):
        load_base_model(helpers.model_config(folder))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_refused_before_loading(tiny_base_dir):
    cfg = helpers.model_config(tiny_base_dir).model_copy(update={"device": "cuda:0"})
    with pytest.raises(DeviceError, match="'cuda:0'"):
        load_base_model(cfg)
