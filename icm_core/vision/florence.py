"""Florence-2 (the paper's detector) as a LoRA-tunable detector, in transformers' native format.

Florence-2 is an encoder-decoder vision-language model: the image's visual tokens and a task prompt go
into a BART-like encoder, and the decoder writes the answer as text. For object detection (task ``<OD>``)
the answer is, per box, the label text then four location tokens ``<loc_x1><loc_y1><loc_x2><loc_y2>``,
each coordinate quantised to ``location_bins`` (1000) bins of the image's width or height, e.g.
``dog<loc_52><loc_333><loc_932><loc_774>cat<loc_...>...`` (the format transformers' ``Florence2PostProcessor``
parses; its ``quantize``: ``floor(x / (width / bins))`` clamped to ``[0, bins - 1]``, ``dequantize``: the
bin's centre ``(k + 0.5) * width / bins``).

Here, without Florence-2's processor files:

- **Inputs**: images resized (bicubic, antialiased) to ``input_size`` squares (768 for Florence-2) and
  normalised with ImageNet mean/std (Florence-2's ``CLIPImageProcessor`` settings); the encoder input is
  ``<image>`` x (number of visual tokens) + ``<s>`` + prompt text + ``</s>``, the layout of
  ``Florence2Processor`` (``<OD>`` expands to "Locate the objects with category name in the image.").
- **Loss**: the model's own seq2seq cross-entropy against ``<s>`` + target text + ``</s>`` (``labels``;
  the decoder input is ``labels`` shifted right, as in Florence-2's fine-tuning recipe). Boxes are written in
  reading order (top to bottom, then left to right) under the task's category name.
- **Detection**: greedy ``generate`` (``num_beams=1``, no sampling: deterministic), parsed back into boxes
  (de-quantised to bin centres). A box's score is the mean probability (softmax of ``output_scores`` at each
  step) of the tokens that produced it: its label tokens (when the label was written right before it) and
  its four location tokens. Greedy decoding has no other confidence, and COCOeval needs a ranking. Boxes
  whose label is not one of the task's category names (case-insensitive) are dropped.
- **Task vector**: the decoder's last layer output at the last time step (the step that predicts ``</s>``)
  of a teacher-forced forward pass over prompt + target, averaged over samples: the paper's "final hidden
  states at the last time-step from the last layer of Florence-2's decoder", of size ``d_model``.
- **LoRA targets**: Florence-2's language model uses BART's names: ``q_proj``, ``k_proj``, ``v_proj``,
  ``out_proj`` (encoder self-attention, decoder self- and cross-attention) and ``fc1`` / ``fc2``; the vision
  tower's attention is ``qkv`` / ``proj``. ``lora.target_modules=[q_proj,v_proj]`` is a sensible default
  (only the language model); suffixes such as ``decoder.layers.5.self_attn.q_proj`` narrow it further.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icm_core.vision.config import DetectorConfig
from icm_core.vision.hf_detector import DetectorLoadError, _unwrap, pixel_values


# Florence2Processor.task_prompts_without_inputs: a bare task token stands for this prompt text.
TASK_PROMPTS = {
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}


@dataclass(frozen=True)
class FlorenceVocab:
    """A Florence-2 tokenizer and the ids the detector needs."""

    tokenizer: Any
    loc_ids: tuple[int, ...]
    bos_id: int
    eos_id: int
    pad_id: int

    @functools.cached_property
    def bin_of(self) -> dict[int, int]:
        return {token: k for k, token in enumerate(self.loc_ids)}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        # One tokenizer is shared by a flow's concurrent task threads; a fast tokenizer used from two threads
        # at once can fail with "Already borrowed".
        with _TOKENIZER_LOCK:
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        with _TOKENIZER_LOCK:
            return self.tokenizer.decode(ids, skip_special_tokens=True)


_TOKENIZER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_vocab(name_or_path: str, trust_remote_code: bool, bins: int) -> FlorenceVocab:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise DetectorLoadError(f"detector.name_or_path={name_or_path!r}: no loadable tokenizer ({exc})") from exc
    names = [f"<loc_{k}>" for k in range(bins)]
    ids = tokenizer.convert_tokens_to_ids(names)
    unk = tokenizer.unk_token_id
    missing = [n for n, i in zip(names, ids, strict=True) if i is None or i == unk]
    if missing:
        raise DetectorLoadError(
            f"detector.name_or_path={name_or_path!r}: the tokenizer lacks {len(missing)} of the location tokens "
            f"<loc_0>..<loc_{bins - 1}> (first missing: {missing[0]}); Florence-2's tokenizer has them "
            "(detector.location_bins sets how many are expected)"
        )
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    absent = [k for k, v in special.items() if v is None]
    if absent:
        raise DetectorLoadError(f"detector.name_or_path={name_or_path!r}: the tokenizer has no {absent} token")
    return FlorenceVocab(tokenizer, tuple(int(i) for i in ids), special["bos"], special["eos"], special["pad"])


def florence_vocab(det_cfg: DetectorConfig) -> FlorenceVocab:
    """The tokenizer of ``det_cfg.name_or_path`` (cached), checked for the location tokens."""
    return _load_vocab(det_cfg.name_or_path, det_cfg.trust_remote_code, det_cfg.location_bins)


def load_florence(det_cfg: DetectorConfig) -> torch.nn.Module:
    """``Florence2ForConditionalGeneration`` from safetensors weights, in eval mode; its tokenizer is checked."""
    from transformers import Florence2ForConditionalGeneration

    try:
        model = Florence2ForConditionalGeneration.from_pretrained(
            det_cfg.name_or_path, trust_remote_code=det_cfg.trust_remote_code, use_safetensors=True
        )
    except Exception as exc:
        raise DetectorLoadError(
            f"detector.name_or_path={det_cfg.name_or_path!r}: not a loadable Florence-2 model in transformers' "
            f"native format with safetensors weights ({exc})"
        ) from exc
    florence_vocab(det_cfg)
    return model.eval()


# ------------------------------------------------------------------------------------------ text format


def quantize(boxes: np.ndarray, width: int, height: int, bins: int = 1000) -> np.ndarray:
    """xyxy pixel boxes -> location bins (Florence2PostProcessor.quantize)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64) / bins
    return np.clip(np.floor(b / scale), 0, bins - 1).astype(np.int64)


def dequantize(bins_xyxy: np.ndarray, width: int, height: int, bins: int = 1000) -> np.ndarray:
    """Location bins -> xyxy pixel boxes at the bins' centres (Florence2PostProcessor.dequantize)."""
    q = np.asarray(bins_xyxy, dtype=np.float64).reshape(-1, 4)
    return (q + 0.5) * np.array([width, height, width, height], dtype=np.float64) / bins


def target_text(boxes: np.ndarray, label: str, width: int, height: int, bins: int = 1000) -> str:
    """Florence-2's ``<OD>`` answer for one image: per box (reading order), the label then 4 location tokens."""
    q = quantize(boxes, width, height, bins)
    order = np.lexsort((q[:, 0], q[:, 1]))
    return "".join(label + "".join(f"<loc_{int(v)}>" for v in q[i]) for i in order)


@dataclass
class ParsedBox:
    """One box read from generated tokens."""

    label: str
    box: np.ndarray
    score: float


def parse_tokens(
    token_ids: list[int],
    vocab: FlorenceVocab,
    width: int,
    height: int,
    probs: list[float] | None = None,
) -> list[ParsedBox]:
    """Boxes in generated ids (without the decoder start token): label text, then groups of 4 location tokens.

    A label followed by several groups of 4 gives one box per group (as Florence2PostProcessor reads
    ``car<loc_..>x8``); an incomplete group is dropped; reading stops at ``</s>``. ``probs`` (one per id)
    give each box its score: the mean over the label's tokens (for the first box after a label) and the
    box's four location tokens; without them the score is 1.
    """
    bins = len(vocab.loc_ids)
    bin_of = vocab.bin_of
    out: list[ParsedBox] = []
    label, label_ids, label_p, locs, loc_p = "", [], [], [], []
    for i, token in enumerate(token_ids):
        token = int(token)
        p = 1.0 if probs is None else float(probs[i])
        if token == vocab.eos_id:
            break
        if token in (vocab.bos_id, vocab.pad_id):
            continue
        if token in bin_of:
            if label_ids:  # a new label ends here
                label = vocab.decode(label_ids).strip()
                label_ids = []
            locs.append(bin_of[token])
            loc_p.append(p)
            if len(locs) == 4:
                box = dequantize(np.asarray(locs), width, height, bins)[0]
                out.append(ParsedBox(label, box, float(np.mean(label_p + loc_p))))
                locs, loc_p, label_p = [], [], []
            continue
        if not label_ids:  # text after location tokens starts a new label; drop a half-written box
            locs, loc_p, label_p = [], [], []
        label_ids.append(token)
        label_p.append(p)
    return out


# ----------------------------------------------------------------------------------------- encoding


def image_token_count(config, input_size: int) -> int:
    """Visual tokens of a ``input_size`` square: the DaViT stages' output grid plus one temporal token."""
    vision = config.vision_config
    side = input_size
    for kernel, stride, pad in zip(vision.patch_size, vision.patch_stride, vision.patch_padding, strict=True):
        side = (side + 2 * pad - kernel) // stride + 1
    return side * side + 1


def prompt_ids(model: torch.nn.Module, det_cfg: DetectorConfig) -> list[int]:
    """Encoder input ids: ``<image>`` placeholders, ``<s>``, the task prompt, ``</s>``."""
    vocab = florence_vocab(det_cfg)
    config = _unwrap(model).config
    text = TASK_PROMPTS.get(det_cfg.task_prompt, det_cfg.task_prompt)
    ids = vocab.encode(text)
    return [config.image_token_id] * image_token_count(config, det_cfg.input_size) + [vocab.bos_id, *ids, vocab.eos_id]


def task_label(info: dict[str, Any]) -> str:
    """The label text the task's boxes are written under: its COCO category name ('face' for face tasks)."""
    names = info.get("category_names") or {}
    cid = info["category_ids"][0]
    if cid in names:
        return str(names[cid])
    return "face" if info.get("source") == "faces" else str(info["name"])


def _inputs(model: torch.nn.Module, images: list[np.ndarray], det_cfg: DetectorConfig) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(model, det_cfg)] * len(images), device=device)
    dtype = next(_unwrap(model).parameters()).dtype
    px = pixel_values(images, det_cfg.input_size, device, mode="bicubic", antialias=True).to(dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px}


def _labels(
    images: list[np.ndarray], boxes: list[np.ndarray], label: str, det_cfg: DetectorConfig, device: torch.device
) -> torch.Tensor:
    """``<s>`` + target text + ``</s>`` per image, right-padded with -100 (ignored by the loss)."""
    vocab = florence_vocab(det_cfg)
    rows = []
    for image, b in zip(images, boxes, strict=True):
        h, w = image.shape[:2]
        text = target_text(b, label, w, h, det_cfg.location_bins)
        rows.append([vocab.bos_id, *vocab.encode(text), vocab.eos_id])
    length = max(len(r) for r in rows)
    return torch.tensor([r + [-100] * (length - len(r)) for r in rows], device=device)


def florence_loss_fn(
    images: list[np.ndarray], gt: list[np.ndarray], det_cfg: DetectorConfig, info: dict[str, Any]
) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """Loss over a batch of image indices: the model's seq2seq cross-entropy on the ``<OD>`` answers."""
    label = task_label(info)

    def loss_fn(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        picks = [int(i) for i in idx]
        chunk = [images[i] for i in picks]
        inputs = _inputs(model, chunk, det_cfg)
        labels = _labels(chunk, [gt[i] for i in picks], label, det_cfg, inputs["input_ids"].device)
        return model(**inputs, labels=labels).loss

    return loss_fn


@torch.no_grad()
def florence_detect(
    model: torch.nn.Module,
    images: list[np.ndarray],
    det_cfg: DetectorConfig,
    info: dict[str, Any],
    batch_size: int = 8,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """Per image: the generated boxes labelled with one of the task's categories (score >= ``score_threshold``),
    in pixels (xyxy), their scores, and their COCO category ids."""
    vocab = florence_vocab(det_cfg)
    base = _unwrap(model)
    names = {str(n).lower(): cid for cid, n in (info.get("category_names") or {}).items()}
    names.setdefault(task_label(info).lower(), info["category_ids"][0])
    results, labels = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        out = base.generate(
            **_inputs(model, chunk, det_cfg),
            max_new_tokens=det_cfg.max_new_tokens,
            do_sample=False,
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
        # sequences[:, 0] is the decoder start token; scores[t] produced sequences[:, t + 1].
        generated = out.sequences[:, 1 : 1 + len(out.scores)]
        step_p = torch.stack(
            [s.float().softmax(-1).gather(1, generated[:, t : t + 1])[:, 0] for t, s in enumerate(out.scores)], 1
        ).cpu()
        for k, image in enumerate(chunk):
            h, w = image.shape[:2]
            parsed = parse_tokens(generated[k].tolist(), vocab, w, h, step_p[k].tolist())
            keep = [p for p in parsed if p.label.lower() in names and p.score >= det_cfg.score_threshold]
            boxes = np.asarray([p.box for p in keep], dtype=np.float64).reshape(-1, 4)
            results.append((boxes, np.asarray([p.score for p in keep], dtype=np.float64)))
            labels.append(np.asarray([names[p.label.lower()] for p in keep], dtype=np.int64))
    return results, labels


@torch.no_grad()
def florence_hidden(
    model: torch.nn.Module,
    images: list[np.ndarray],
    gt: list[np.ndarray],
    det_cfg: DetectorConfig,
    info: dict[str, Any],
    batch_size: int = 8,
) -> torch.Tensor:
    """The decoder's last layer at the last time step of each image's teacher-forced answer: [N, d_model]."""
    label = task_label(info)
    rows = []
    for start in range(0, len(images), batch_size):
        chunk, boxes = images[start : start + batch_size], gt[start : start + batch_size]
        inputs = _inputs(model, chunk, det_cfg)
        labels = _labels(chunk, boxes, label, det_cfg, inputs["input_ids"].device)
        out = model(**inputs, labels=labels, output_hidden_states=True)
        last = (labels != -100).sum(1) - 1  # the step whose input is the last answer token (it predicts </s>)
        hidden = out.decoder_hidden_states[-1]
        rows.append(hidden[torch.arange(len(chunk), device=hidden.device), last].float().cpu())
    return torch.cat(rows)
