"""Florence-2 as the detector, on a tiny randomly initialised Florence2ForConditionalGeneration (tiny DaViT
vision tower, tiny BART text model) and a tiny word-level tokenizer with the 1000 location tokens, both
built here and saved to a temporary folder (nothing downloaded, no real Florence-2 weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from icm_core.infra.io import load_tensors
from icm_core.lora.adapters import merge_adapter
from icm_core.lora.trajectory import read_trajectory
from icm_core.vision.coco import coco_from_dict, detections_to_coco, evaluate_coco
from icm_core.vision.config import DetectionLoraConfig, DetectionTaskVectorConfig, DetectorConfig
from icm_core.vision.florence import (
    florence_detect,
    florence_loss_fn,
    florence_vocab,
    image_token_count,
    load_florence,
    parse_tokens,
    prompt_ids,
    quantize,
    target_text,
)
from icm_core.vision.hf_detector import DetectorLoadError
from icm_core.vision.stages import (
    detector_task_vector,
    evaluate_detector,
    finetune_detector,
    gt_boxes_xyxy,
    load_detector,
    load_split,
    prepare_detection_task,
    read_task,
)
from tests.core.vision.test_hf_detector import shapes_data_config


WORDS = ["Locate", "the", "objects", "with", "category", "name", "in", "image", ".", "square", "disc", "face"]


def tiny_tokenizer(with_locations: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS])}  # BART's special ids
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_tokens(["<OD>", "<image>"] + ([f"<loc_{k}>" for k in range(1000)] if with_locations else []))
    return tokenizer


def tiny_florence(folder: Path, with_locations: bool = True) -> Path:
    from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    tokenizer = tiny_tokenizer(with_locations)
    vision = Florence2VisionConfig(
        depths=(1, 1),
        patch_size=(7, 3),
        patch_stride=(4, 2),
        patch_padding=(3, 1),
        patch_prenorm=(False, True),
        embed_dim=(8, 16),
        num_heads=(1, 2),
        num_groups=(1, 2),
        window_size=2,
        projection_dim=16,
        drop_path_rate=0.0,
        max_position_embeddings=16,
    )
    text = BartConfig(
        vocab_size=max(len(tokenizer), 32),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    config = Florence2Config(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>")
    )
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("florence")
    model_dir = tiny_florence(root / "florence")
    data_cfg = shapes_data_config(root / "coco")
    det_cfg = DetectorConfig(
        kind="florence2", name_or_path=str(model_dir), input_size=32, score_threshold=0.0, max_new_tokens=16
    )
    for task in data_cfg.tasks:
        prepare_detection_task(task, data_cfg, root / "tasks" / task)
    return root, det_cfg


def test_target_text_round_trip(setup):
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    _, det_cfg = setup
    vocab = florence_vocab(det_cfg)
    rng = np.random.default_rng(0)
    width, height = 80, 64
    xy = rng.uniform(0, [width, height], size=(5, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, size=(5, 2))], axis=1).clip(0, [width, height] * 2)
    text = target_text(boxes, "square", width, height)
    assert text.startswith("square<loc_") and text.count("square") == 5 and text.count("<loc_") == 20

    ids = [vocab.bos_id, *vocab.tokenizer(text, add_special_tokens=False).input_ids, vocab.eos_id, vocab.pad_id]
    parsed = parse_tokens(ids, vocab, width, height)
    assert [p.label for p in parsed] == ["square"] * 5
    got = np.stack([p.box for p in parsed])
    order = np.lexsort((boxes[:, 0], boxes[:, 1]))  # written in reading order
    bin_size = np.array([width, height, width, height]) / 1000
    assert np.all(np.abs(got - boxes[order]) <= bin_size)
    # transformers' own <OD> parser reads the same text into the same boxes (it truncates to int pixels).
    reference = Florence2PostProcessor({}, vocab.tokenizer).parse_description_with_bboxes_from_text_and_spans(
        text, image_size=(width, height)
    )
    assert [r["cat_name"] for r in reference] == ["square"] * 5
    assert np.array_equal(np.asarray([r["bbox"] for r in reference]), np.floor(got))
    assert np.array_equal(quantize(got, width, height), quantize(boxes[order], width, height))

    # A label followed by two boxes gives two boxes; a half-written box and text after </s> are dropped.
    loc = vocab.loc_ids
    disc = vocab.tokenizer.convert_tokens_to_ids("disc")
    seq = [disc, loc[1], loc[2], loc[3], loc[4], loc[5], loc[6], loc[7], loc[8], disc, loc[9], vocab.eos_id, disc]
    probs = [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9, 1.0, 1.0]
    two = parse_tokens(seq, vocab, 1000, 1000, probs)
    assert [(p.label, p.box.tolist()) for p in two] == [
        ("disc", [1.5, 2.5, 3.5, 4.5]),
        ("disc", [5.5, 6.5, 7.5, 8.5]),
    ]
    assert [p.score for p in two] == pytest.approx([0.9, 0.5])  # label + locations, then locations only


def test_loader_and_prompt(setup):
    _, det_cfg = setup
    assert DetectorConfig(kind="florence2").input_size == 768  # Florence-2's training size unless set
    assert DetectorConfig(kind="transformers").input_size == 512
    model = load_florence(det_cfg)
    n = image_token_count(model.config, det_cfg.input_size)
    assert model.get_image_features(torch.zeros(1, 3, 32, 32)).pooler_output.shape[1] == n == 17
    ids = prompt_ids(model, det_cfg)
    vocab = florence_vocab(det_cfg)
    assert ids[:n] == [model.config.image_token_id] * n and ids[n] == vocab.bos_id and ids[-1] == vocab.eos_id
    assert vocab.tokenizer.unk_token_id not in ids
    assert vocab.tokenizer.decode(ids[n + 1 : -1]) == "Locate the objects with category name in the image."


def test_tokenizer_without_locations_is_refused(tmp_path: Path):
    folder = tiny_florence(tmp_path / "no-loc", with_locations=False)
    cfg = DetectorConfig(kind="florence2", name_or_path=str(folder), input_size=32)
    with pytest.raises(DetectorLoadError, match=r"no-loc'.*lacks 1000 of the location tokens <loc_0>..<loc_999>"):
        load_detector(cfg)


def test_detection_parses_generated_boxes(setup):
    """Fit the tiny model (all weights) to one image's answer, then greedy generation writes it back: the
    detections are the ground-truth boxes (to a bin) with scores, and COCOeval scores them 1.0."""
    root, det_cfg = setup
    task = root / "tasks" / "square"
    info = read_task(task)
    coco, records, images = load_split(task, "train")
    gt = gt_boxes_xyxy(coco, records, info["category_ids"])
    model = load_florence(det_cfg)
    loss_fn = florence_loss_fn(images[:1], gt[:1], det_cfg, info)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(60):
        loss = loss_fn(model, torch.tensor([0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert float(loss.detach()) < 0.1
    detections, labels = florence_detect(model, images[:1], det_cfg, info)
    boxes, scores = detections[0]
    assert boxes.shape == (1, 4) and scores.shape == (1,) and labels[0].tolist() == [1]
    h, w = images[0].shape[:2]
    assert np.all(np.abs(boxes[0] - gt[0][0]) <= np.array([w, h, w, h]) / 1000) and 0.5 < scores[0] <= 1.0
    one = coco_from_dict({**coco.dataset, "images": [records[0]], "annotations": coco.imgToAnns[records[0]["id"]]})
    results = detections_to_coco([records[0]["id"]], detections, 1, labels)
    assert evaluate_coco(one, results, [1])["map50"] == pytest.approx(1.0)


def test_lora_task_vectors_and_map(setup):
    root, det_cfg = setup
    lora_cfg = DetectionLoraConfig(
        target_modules=("q_proj", "v_proj"), steps=3, trajectory_size=2, warmup_steps=0, batch_size=2, lr=1e-2
    )
    vectors = {}
    for task in ("square", "disc"):
        result = finetune_detector(root / "tasks" / task, det_cfg, lora_cfg, root / "lora" / task)
        assert len(result["checkpoints"]) == 2 and np.isfinite(result["final_loss"])
        tv = detector_task_vector(
            root / "tasks" / task,
            root / "lora" / task,
            det_cfg,
            DetectionTaskVectorConfig(num_samples=2),
            root / f"tv-{task}.safetensors",
        )
        assert tv["dim"] == 16  # the text model's d_model
        vectors[task] = load_tensors(tv["path"])[0]["task_vector"]
    assert not torch.allclose(vectors["square"], vectors["disc"])

    adapter = read_trajectory(root / "lora" / "square").adapter_dir
    merged = merge_adapter(load_detector(det_cfg), adapter)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for score in (evaluate_detector(root / "tasks" / "square", a, det_cfg) for a in (None, adapter)):
        assert 0.0 <= score["map50"] <= 1.0 and score["images"] == 2
