"""The shared prefix cache (icm_core.models.prefix): equal to the model's own states, computed once, invalidated
when the model's weights below the layer or the blocks change, and kept on disk when asked."""

from __future__ import annotations

import pytest
import torch

from icm_core.infra.io import sidecar_path
from icm_core.models.prefix import block_states, blocks_digest, decoder_stack, layers_from
from tests import helpers


@pytest.fixture
def model():
    return helpers.tiny_model(num_layers=3)


@pytest.fixture
def blocks():
    return torch.randint(2, 40, (5, 12), generator=torch.Generator().manual_seed(0))


def count_layer0(model) -> list[int]:
    calls: list[int] = []
    decoder_stack(model).layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_states_equal_the_whole_forwards_hidden_states(model, blocks):
    with torch.no_grad():
        want = model(input_ids=blocks, output_hidden_states=True).hidden_states[2]
    got = block_states(model, blocks, 2, batch_size=2)
    assert got.shape == (5, 12, model.config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_computed_once_then_served_from_memory(model, blocks):
    calls = count_layer0(model)
    first = block_states(model, blocks, 1, batch_size=2)
    assert len(calls) == 3  # ceil(5 / 2) batches
    assert block_states(model, blocks, 1, batch_size=2) is first
    assert len(calls) == 3


def test_a_changed_block_or_model_weight_recomputes(model, blocks):
    calls = count_layer0(model)
    first = block_states(model, blocks, 2, batch_size=5)
    other = blocks.clone()
    other[0, 3] += 1
    changed_block = block_states(model, other, 2, batch_size=5)
    assert len(calls) == 2 and not torch.equal(changed_block[0], first[0])
    torch.testing.assert_close(changed_block[1:], first[1:])
    # A weight below the layer changed in place (e.g. an adapter merged there): the states are stale.
    with torch.no_grad():
        decoder_stack(model).layers[1].mlp.up_proj.weight.mul_(1.5)
    changed_model = block_states(model, blocks, 2, batch_size=5)
    assert len(calls) == 3 and not torch.allclose(changed_model, first)
    # A weight at or above the layer does not enter the states: still cached.
    with torch.no_grad():
        decoder_stack(model).layers[2].mlp.up_proj.weight.mul_(1.5)
    assert block_states(model, blocks, 2, batch_size=5) is changed_model
    # Another model object with other weights gets its own states.
    assert not torch.allclose(block_states(helpers.tiny_model(seed=1, num_layers=3), blocks, 2, 5), first)


def test_kept_on_disk_for_another_process(model, blocks, tmp_path):
    first = block_states(model, blocks, 2, batch_size=5, store=tmp_path, model_id="tiny-0")
    files = list(tmp_path.glob("prefix-*.safetensors"))
    assert len(files) == 1 and sidecar_path(files[0]).is_file()
    fresh = helpers.tiny_model(num_layers=3)  # same weights, a new object: its memory cache is empty
    calls = count_layer0(fresh)
    again = block_states(fresh, blocks, 2, batch_size=5, store=tmp_path, model_id="tiny-0")
    assert calls == [] and torch.equal(again, first)
    other = helpers.tiny_model(seed=1, num_layers=3)
    block_states(other, blocks, 2, batch_size=5, store=tmp_path, model_id="tiny-1")  # another model: its own file
    assert len(list(tmp_path.glob("prefix-*.safetensors"))) == 2


def test_bad_requests_are_named(model, blocks):
    with pytest.raises(ValueError, match="start layer 3"):
        block_states(model, blocks, 3)
    with pytest.raises(ValueError, match="no decoder layer stack"):
        block_states(torch.nn.Linear(2, 2), blocks, 1)


def test_digest_sees_shape_and_content(blocks):
    assert blocks_digest(blocks) == blocks_digest(blocks.clone())
    assert blocks_digest(blocks) != blocks_digest(blocks.view(10, 6))
    assert blocks_digest(blocks) != blocks_digest(blocks.flip(0))


def test_layers_from_restores_the_list(model):
    with layers_from(model, 1):
        assert len(decoder_stack(model).layers) == 2
    assert len(decoder_stack(model).layers) == 3
