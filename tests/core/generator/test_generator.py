"""End-to-end tests of icm_core.generator.generator on the tiny model: two categories' LoRA trajectories and task
vectors -> one CVAE -> saved generator -> generated PEFT adapters that load and merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icm_core.generator.config import CVAEConfig, SampleConfig
from icm_core.generator.dataset import build_dataset
from icm_core.generator.generator import Generator, load_generator, save_generator
from icm_core.generator.task_vectors import hidden_state_task_vector
from icm_core.generator.train import train_generator
from icm_core.infra.io import ArtifactError, save_tensors, sha256_file
from icm_core.lora.adapters import ADAPTER_WEIGHTS, load_adapter, merge_adapter, write_adapter
from icm_core.lora.flatten import flatten_lora, lora_layout
from icm_core.lora.train import train_lora
from icm_core.lora.trajectory import load_trajectory_checkpoints
from tests import helpers


CVAE = CVAEConfig(channels=(4, 8, 8, 4), latent_dim=16, epochs=6, batch_size=4, lr=1e-3, seed=7)
LORA = helpers.lora_config(steps=6, trajectory_size=3, checkpoint_every=2, lr=3e-2, batch_size=2)
TEXTS = {"prose": helpers.SAMPLE_TEXT, "symbols": helpers.OTHER_TEXT}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_cfg):
    """Two categories fine-tuned on different text, their task vectors (saved too), and their checkpoints."""
    from icm_core.models.base_model import load_base_model

    root = tmp_path_factory.mktemp("generator")
    base_id = tiny_model_cfg.name_or_path
    trajectories, vectors, vector_files, checkpoints = {}, {}, {}, {}
    for name, text in TEXTS.items():
        blocks = helpers.char_blocks(text, 24, repeat=2)
        trajectory = train_lora(load_base_model(tiny_model_cfg), blocks, LORA, root / "lora" / name, base_id)
        tuned = load_adapter(load_base_model(tiny_model_cfg), trajectory.adapter_dir, base_id)
        vectors[name] = hidden_state_task_vector(tuned, blocks[:4])
        vector_files[name] = root / "tv" / f"{name}.safetensors"
        save_tensors(vector_files[name], {"task_vector": vectors[name]}, {"category": name})
        trajectories[name] = trajectory
        checkpoints[name] = load_trajectory_checkpoints(trajectory.folder)
    return {
        "root": root,
        "trajectories": trajectories,
        "vectors": vectors,
        "vector_files": vector_files,
        "checkpoints": checkpoints,
    }


@pytest.fixture(scope="module")
def dataset(trained):
    return build_dataset(trained["checkpoints"], trained["vectors"])


@pytest.fixture(scope="module")
def generator(trained, dataset) -> Generator:
    adapter_config = trained["trajectories"]["prose"].adapter_config
    gen, history, seconds = train_generator(dataset, CVAE, adapter_config)
    assert len(history) == CVAE.epochs and seconds >= 0
    return gen


@pytest.fixture(scope="module")
def saved(generator, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "generator.safetensors"
    save_generator(path, generator, {"note": "test"})
    return path


def test_categories_differ(trained):
    a, b = trained["checkpoints"]["prose"][-1], trained["checkpoints"]["symbols"][-1]
    assert set(a) == set(b)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(trained["vectors"]["prose"], trained["vectors"]["symbols"])


def test_build_dataset(trained, dataset):
    layout = lora_layout(trained["checkpoints"]["prose"][0])
    assert dataset.layout == layout
    assert dataset.weights.shape == (6, layout.total)
    assert dataset.conds.shape == (6, helpers.HIDDEN)
    assert dataset.row_category == ["prose"] * 3 + ["symbols"] * 3
    for row, (name, i) in enumerate([(n, i) for n in ("prose", "symbols") for i in range(3)]):
        assert torch.equal(dataset.weights[row], flatten_lora(trained["checkpoints"][name][i], layout)[0])
        assert torch.equal(dataset.conds[row], trained["vectors"][name])
    assert sorted(dataset.task_vectors) == ["prose", "symbols"]


def test_generate_gives_a_state_dict_in_the_layout(generator, dataset):
    state = generator.generate_for("prose", SampleConfig(seed=0))
    assert list(state) == dataset.layout.keys
    for spec in dataset.layout.specs:
        assert tuple(state[spec.key].shape) == spec.shape
        assert bool(torch.isfinite(state[spec.key]).all())
    again = generator.generate_for("prose", SampleConfig(seed=0))
    assert all(torch.equal(state[k], again[k]) for k in state)
    other_seed = generator.generate_for("prose", SampleConfig(seed=1))
    assert any(not torch.equal(state[k], other_seed[k]) for k in state)
    other_task = generator.generate_for("symbols", SampleConfig(seed=0))
    assert any(not torch.equal(state[k], other_task[k]) for k in state)
    averaged = generator.generate_for("prose", SampleConfig(seed=0, num_draws=3))
    assert set(averaged) == set(state)


def test_save_load_round_trip(generator, saved):
    loaded = load_generator(saved)
    assert loaded.layout == generator.layout
    assert loaded.cond_dim == generator.cond_dim == helpers.HIDDEN
    assert loaded.adapter_config == generator.adapter_config
    assert sorted(loaded.task_vectors) == ["prose", "symbols"]
    assert all(torch.equal(loaded.task_vectors[n], generator.task_vectors[n]) for n in generator.task_vectors)
    assert torch.equal(loaded.norm.mean, generator.norm.mean) and torch.equal(loaded.norm.std, generator.norm.std)
    assert loaded.cond_norm.scale == generator.cond_norm.scale
    assert loaded.meta["note"] == "test" and loaded.meta["categories"] == ["prose", "symbols"]
    original_state = generator.model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, original_state[key]), key
    for name in ("prose", "symbols"):
        for seed in (0, 5):
            cfg = SampleConfig(seed=seed, num_draws=2)
            a, b = generator.generate_for(name, cfg), loaded.generate_for(name, cfg)
            assert all(torch.equal(a[k], b[k]) for k in a), (name, seed)
    vector = torch.randn(helpers.HIDDEN, generator=torch.Generator().manual_seed(0))
    a, b = generator.generate(vector, SampleConfig(seed=3)), loaded.generate(vector, SampleConfig(seed=3))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saving_is_byte_deterministic(generator, saved, tmp_path):
    again = tmp_path / "again.safetensors"
    digest = save_generator(again, generator, {"note": "test"})
    assert digest == sha256_file(saved)
    assert again.read_bytes() == saved.read_bytes()


def test_generated_adapter_loads_and_merges(generator, fresh_base, tiny_model_cfg, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    state = generator.generate_for("symbols", SampleConfig(seed=0))
    folder = write_adapter(tmp_path / "adapter", state, generator.adapter_config)
    assert (folder / ADAPTER_WEIGHTS).is_file()

    peft_model = PeftModel.from_pretrained(fresh_base(), str(folder)).eval()
    loaded = get_peft_model_state_dict(peft_model)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k].float(), state[k]) for k in state)

    ids = helpers.char_blocks(helpers.OTHER_TEXT, 24)[:2]
    with torch.no_grad():
        base_logits = fresh_base()(input_ids=ids).logits
        peft_logits = peft_model(input_ids=ids).logits
        merged = merge_adapter(fresh_base(), folder, tiny_model_cfg.name_or_path)
        merged_logits = merged(input_ids=ids).logits
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)
    assert not torch.allclose(base_logits, peft_logits)


def test_build_dataset_rejects_other_rank(trained):
    rank4 = helpers.random_lora_state(helpers.tiny_model(), helpers.lora_config(rank=4))
    checkpoints = {"prose": trained["checkpoints"]["prose"], "wide": [rank4]}
    vectors = {"prose": trained["vectors"]["prose"], "wide": trained["vectors"]["symbols"]}
    with pytest.raises(ValueError, match="rank") as info:
        build_dataset(checkpoints, vectors)
    assert "'wide'" in str(info.value)


def test_build_dataset_rejects_other_targets(trained):
    other = helpers.random_lora_state(helpers.tiny_model(), helpers.lora_config(target_modules=("q_proj", "k_proj")))
    checkpoints = {"prose": trained["checkpoints"]["prose"], "other": [other]}
    with pytest.raises(ValueError, match="keys differ"):
        build_dataset(checkpoints, {"prose": trained["vectors"]["prose"], "other": trained["vectors"]["symbols"]})


def test_build_dataset_rejects_bad_task_vectors(trained):
    checkpoints = trained["checkpoints"]
    with pytest.raises(ValueError, match="one size"):
        build_dataset(checkpoints, {"prose": torch.zeros(32), "symbols": torch.zeros(16)})
    with pytest.raises(ValueError, match="1-D"):
        build_dataset(checkpoints, {"prose": torch.zeros(2, 16), "symbols": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="symbols"):
        build_dataset(checkpoints, {"prose": torch.zeros(32)})


def test_build_dataset_rejects_empty_input(trained):
    with pytest.raises(ValueError, match="no categories"):
        build_dataset({}, {})
    vectors = trained["vectors"]
    with pytest.raises(ValueError, match="empty trajectory"):
        build_dataset({"prose": [], "symbols": trained["checkpoints"]["symbols"]}, vectors)
    with pytest.raises(ValueError, match="empty trajectory"):
        build_dataset({"prose": trained["checkpoints"]["prose"], "symbols": []}, vectors)


def test_load_generator_refuses_other_artifacts(tmp_path, trained):
    with pytest.raises(ArtifactError, match="not an icm-lora generator"):
        load_generator(trained["vector_files"]["prose"])
    plain = tmp_path / "plain.safetensors"
    save_tensors(plain, {"x": torch.zeros(3)})
    with pytest.raises(ArtifactError, match="plain.safetensors"):
        load_generator(plain)
    pickle = tmp_path / "gen.safetensors"
    torch.save({"x": torch.zeros(3)}, pickle)
    with pytest.raises(ArtifactError, match="pickle"):
        load_generator(pickle)


def test_generate_rejects_wrong_dimension(generator):
    with pytest.raises(ValueError, match=r"\(7,\)") as info:
        generator.generate(torch.zeros(7))
    assert str(helpers.HIDDEN) in str(info.value)
    with pytest.raises(ValueError, match="NaN"):
        generator.generate(torch.full((helpers.HIDDEN,), float("nan")))
    with pytest.raises(KeyError, match="unknown"):
        generator.generate_for("unknown")


def test_stage_functions_end_to_end(trained, generator, tmp_path, tiny_model_cfg):
    """The file-based stages give the same generator as the in-memory path (training is deterministic)."""
    from icm_core.generator.stages import sample_adapter, train_generator_stage
    from icm_core.generator.task_vectors import load_task_vector

    out = tmp_path / "gen" / "generator.safetensors"
    ref = train_generator_stage(
        {n: t.folder for n, t in trained["trajectories"].items()}, trained["vector_files"], CVAE, out
    )
    assert ref["num_checkpoints"] == 6 and ref["flat_length"] == generator.layout.total
    assert Path(ref["path"]) == out and len(ref["sha256"]) == 64
    from_files = load_generator(out)
    cfg = SampleConfig(seed=2)
    a, b = generator.generate_for("prose", cfg), from_files.generate_for("prose", cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)

    by_name = sample_adapter(out, tmp_path / "by-name", cfg, category="prose")
    by_vector = sample_adapter(
        out, tmp_path / "by-vector", cfg, task_vector=load_task_vector(trained["vector_files"]["prose"])
    )
    assert by_name["adapter_sha256"] == by_vector["adapter_sha256"]
    with pytest.raises(ValueError, match="category or a task vector"):
        sample_adapter(out, tmp_path / "neither", cfg)


def _synthetic_category(seed: int, sign: float, n: int = 6) -> list[dict[str, torch.Tensor]]:
    """Checkpoints of one category: a category-specific direction plus a shared 'initialisation' and small noise,
    like a LoRA trajectory (A starts from one random init shared by every category)."""
    shared = torch.Generator().manual_seed(0)
    init_a = torch.randn(2, 24, generator=shared)
    g = torch.Generator().manual_seed(seed)
    direction_b = torch.randn(16, 2, generator=g)
    rows = []
    for _ in range(n):
        rows.append(
            {
                "m.layers.0.q.lora_A.weight": init_a + sign * 0.3 + 0.02 * torch.randn(2, 24, generator=g),
                "m.layers.0.q.lora_B.weight": sign * direction_b.abs() + 0.02 * torch.randn(16, 2, generator=g),
            }
        )
    return rows


@pytest.mark.parametrize("normalization", ["tensor", "coordinate"])
def test_generated_weights_are_close_to_their_own_category(normalization):
    """Quality, not shape: after training, each category's generated adapter lies near its own checkpoints
    (within 30% of the distance between the categories) and far from the other category's."""
    checkpoints = {"up": _synthetic_category(1, 1.0), "down": _synthetic_category(2, -1.0)}
    vectors = {"up": torch.tensor([1.0, 0.0, 0.3]), "down": torch.tensor([0.0, 1.0, -0.3])}
    dataset = build_dataset(checkpoints, vectors)
    cfg = CVAEConfig(channels=(4, 8), latent_dim=8, epochs=150, batch_size=4, lr=3e-3, normalization=normalization)
    gen, history, _ = train_generator(dataset, cfg, {"r": 2, "lora_alpha": 8})
    assert history[-1]["recon"] < 0.1 * history[0]["recon"]  # it learned the data, not just its shapes
    means = {
        name: dataset.weights[[i for i, o in enumerate(dataset.row_category) if o == name]].mean(0)
        for name in checkpoints
    }
    between = float((means["up"] - means["down"]).norm())
    for name, other in (("up", "down"), ("down", "up")):
        flat = flatten_lora(gen.generate_for(name, SampleConfig(seed=3)), dataset.layout)[0]
        own, far = float((flat - means[name]).norm()), float((flat - means[other]).norm())
        assert own < 0.3 * between, (name, own, between)
        assert far > 0.7 * between, (name, far, between)


def test_generator_refuses_a_vector_of_another_kind(generator, trained, tmp_path):
    """The kind recorded in the sidecar is enforced: a description vector cannot condition an Eq. 1 generator."""
    from icm_core.generator.task_vectors import TaskVectorKindError

    path = tmp_path / "generator.safetensors"
    save_generator(path, generator, {"task_vector_kind": "hidden_state:base:tiny"})
    loaded = load_generator(path)
    assert loaded.task_vector_kind == "hidden_state:base:tiny"
    vector = trained["vectors"]["prose"]
    with pytest.raises(TaskVectorKindError, match=r"'description:minilm'.*'hidden_state:base:tiny'"):
        loaded.generate(vector, SampleConfig(), where="new.safetensors", kind="description:minilm")
    with pytest.raises(TaskVectorKindError, match="hidden_state:finetuned:tiny"):
        loaded.generate(vector, SampleConfig(), kind="hidden_state:finetuned:tiny")
    same = loaded.generate(vector, SampleConfig(), kind="hidden_state:base:tiny")
    assert same.keys() == generator.generate(vector, SampleConfig()).keys()


def test_generator_stage_records_the_vectors_kind_and_rejects_mixed_kinds(trained, tmp_path):
    from icm_core.generator.stages import sample_adapter, train_generator_stage
    from icm_core.generator.task_vectors import TaskVectorKindError

    folders = {name: t.folder for name, t in trained["trajectories"].items()}
    files = {}
    for name, vector in trained["vectors"].items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_tensors(files[name], {"task_vector": vector}, {"category": name, "kind": "hidden_state:base:tiny"})
    out = tmp_path / "gen.safetensors"
    train_generator_stage(folders, files, CVAE, out)
    assert load_generator(out).task_vector_kind == "hidden_state:base:tiny"
    with pytest.raises(TaskVectorKindError, match="description:minilm"):
        sample_adapter(
            out,
            tmp_path / "a",
            SampleConfig(),
            task_vector=trained["vectors"]["prose"],
            task_vector_kind="description:minilm",
        )
    assert not (tmp_path / "a").exists()  # refused before anything was written
    save_tensors(files["symbols"], {"task_vector": trained["vectors"]["symbols"]}, {"kind": "description:minilm"})
    with pytest.raises(TaskVectorKindError, match="different kinds"):
        train_generator_stage(folders, files, CVAE, tmp_path / "mixed.safetensors")
