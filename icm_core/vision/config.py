"""Configs of the detection pipeline: one frozen pydantic model per stage, every field documented.

The generator (``CVAEConfig``) and sampling (``SampleConfig``) configs are the language pipeline's own:
the same CVAE trains on flattened detector LoRA weights.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from icm_core.baselines.config import PDiffConfig, SoupConfig
from icm_core.config import METHOD_NAMES
from icm_core.data.names import validate_category_name
from icm_core.generator.config import CVAEConfig, SampleConfig
from icm_core.infra.config import ResumeConfig, StageConfig
from icm_core.lora.config import check_trajectory_fits


DEFAULT_FACE_TASKS: tuple[str, ...] = ("blur", "dark", "noise", "occluded")
MTCNN_TARGETS: tuple[str, ...] = (
    "rnet.dense4",
    "rnet.dense5_1",
    "rnet.dense5_2",
    "onet.dense5",
    "onet.dense6_1",
    "onet.dense6_2",
)


class DetectionDataConfig(StageConfig):
    """Where detection tasks come from.

    ``source='faces'``: the built-in face tasks (LFW faces on real photos under one condition each, see
    ``icm_core/vision/faces.py``). ``source='coco'``: a user COCO annotation file and its image folder,
    split into one task per label (the paper's per-category tasks).
    """

    source: Literal["faces", "coco"] = Field("faces", description="'faces' (built-in) or 'coco' (user files).")
    tasks: tuple[str, ...] = Field(
        DEFAULT_FACE_TASKS,
        min_length=1,
        description="Task names: face conditions (blur, dark, noise, occluded, haze) for 'faces'; COCO category "
        "names for 'coco' (empty tuple is not allowed; list the labels to use).",
    )
    image_size: int = Field(160, ge=64, le=1024, description="'faces': side of the square images in pixels.")
    min_face: int = Field(36, ge=12, description="'faces': smallest pasted face side in pixels.")
    max_face: int = Field(60, ge=12, description="'faces': largest pasted face side in pixels.")
    max_faces: int = Field(2, ge=1, le=6, description="'faces': at most this many faces per image.")
    train_images: int = Field(40, ge=1, description="'faces': training images per task.")
    test_images: int = Field(30, ge=1, description="'faces': test images per task.")
    coco_annotations: str | None = Field(None, description="'coco': path of the COCO annotation JSON.")
    coco_images: str | None = Field(None, description="'coco': folder of the images the annotation file names.")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="'coco': share of each task's images held out.")
    seed: int = Field(0, description="Seed of image rendering ('faces') or the train/test split ('coco').")

    @field_validator("tasks")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"tasks: duplicate names in {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DetectionDataConfig:
        if self.min_face > self.max_face:
            raise ValueError(f"min_face ({self.min_face}) exceeds max_face ({self.max_face})")
        if self.source == "faces":
            from icm_core.vision.faces import CONDITIONS

            unknown = sorted(set(self.tasks) - set(CONDITIONS))
            if unknown:
                raise ValueError(f"tasks: unknown face conditions {unknown}; known: {sorted(CONDITIONS)}")
            if 2 * self.max_face + 12 > self.image_size and self.max_faces > 1:
                raise ValueError(f"image_size {self.image_size} too small for two faces of {self.max_face}px")
        if self.source == "coco" and (not self.coco_annotations or not self.coco_images):
            raise ValueError("source='coco' needs coco_annotations and coco_images")
        return self


class DetectorConfig(StageConfig):
    """The base detector."""

    kind: Literal["mtcnn", "transformers", "florence2"] = Field(
        "mtcnn",
        description="'mtcnn': facenet-pytorch's pretrained MTCNN (CPU). 'transformers': an "
        "AutoModelForObjectDetection (DETR, Conditional-DETR, ...) by local folder or hub id. 'florence2': a "
        "Florence-2 checkpoint in transformers' native format (Florence2ForConditionalGeneration, e.g. "
        "florence-community/Florence-2-base-ft), the paper's detector; see icm_core/vision/florence.py.",
    )
    name_or_path: str = Field(
        "facenet-pytorch",
        description="'mtcnn': 'facenet-pytorch' (weights shipped in the package) or a folder with pnet.pt, rnet.pt, "
        "onet.pt. 'transformers' / 'florence2': a model folder or hub id (for 'florence2' the folder also holds "
        "the tokenizer, with Florence-2's <loc_0>..<loc_999> tokens).",
    )
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:1', or 'auto'.")
    min_face_size: int = Field(20, ge=8, description="'mtcnn': smallest face the P-Net pyramid looks for.")
    thresholds: tuple[float, float, float] = Field(
        (0.4, 0.6, 0.7),
        description="'mtcnn': P/R/O-Net score thresholds. P-Net's is below facenet's 0.6 so the proposal stage "
        "keeps degraded faces; the tuned R/O-Nets decide.",
    )
    input_size: int = Field(
        512,
        ge=32,
        description="'transformers' / 'florence2': images are resized to this square size before the model. "
        "Left unset with kind='florence2' it is 768, the size Florence-2 was trained at.",
    )
    score_threshold: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="'transformers' / 'florence2': detections scoring below this are dropped before mAP.",
    )
    trust_remote_code: bool = Field(
        False,
        description="'transformers' / 'florence2': allow the model folder's own code. Not needed for Florence-2 in "
        "transformers' native format.",
    )
    task_prompt: str = Field(
        "<OD>",
        min_length=1,
        description="'florence2': the task token (expanded to Florence-2's prompt text as its processor does, "
        "e.g. '<OD>' -> 'Locate the objects with category name in the image.') or a literal prompt.",
    )
    max_new_tokens: int = Field(
        1024, ge=8, description="'florence2': most tokens generated per image (label text + 4 per box)."
    )
    location_bins: int = Field(
        1000,
        ge=2,
        le=10000,
        description="'florence2': number of location tokens <loc_0>..<loc_{n-1}> a coordinate is quantised to.",
    )

    @model_validator(mode="before")
    @classmethod
    def _florence_size(cls, data: Any) -> Any:
        # Florence-2 was trained on 768x768 inputs; DETR-like models keep 512 unless set.
        if isinstance(data, dict) and data.get("kind") == "florence2" and "input_size" not in data:
            data = {**data, "input_size": 768}
        return data


class DetectionLoraConfig(StageConfig):
    """LoRA fine-tuning of the detector on one task, and which checkpoints form its trajectory."""

    rank: int = Field(4, ge=1, le=256, description="LoRA rank r.")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha (scaling alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: tuple[str, ...] = Field(
        MTCNN_TARGETS,
        min_length=1,
        description="Module names (suffixes) that get LoRA. MTCNN default: the R-Net and O-Net heads; for DETR-like "
        "models e.g. ('class_labels_classifier', 'bbox_predictor.layers.0', ...).",
    )
    steps: int = Field(150, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Crops (MTCNN) or images (transformers) per step.")
    lr: float = Field(5e-3, gt=0, description="AdamW peak learning rate (warmup, then cosine decay).")
    final_lr_ratio: float = Field(0.05, ge=0, le=1, description="Learning rate at the last step as a share of lr.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    box_weight: float = Field(
        2.0, ge=0, description="'mtcnn': weight of the box-regression loss against the face/non-face loss."
    )
    positives_per_face: int = Field(6, ge=1, description="'mtcnn': jittered crops with IoU >= 0.65 per face.")
    parts_per_face: int = Field(4, ge=0, description="'mtcnn': partial crops (0.4 <= IoU < 0.65) per face.")
    negatives_per_image: int = Field(10, ge=0, description="'mtcnn': background crops (IoU < 0.3) per image.")
    trajectory_size: int = Field(10, ge=1, description="Checkpoints kept from the end of training.")
    checkpoint_every: int = Field(1, ge=1, description="Steps between trajectory checkpoints.")
    seed: int = Field(0, description="Seed of LoRA initialisation, crops and batch order.")

    @model_validator(mode="after")
    def _trajectory_fits(self) -> DetectionLoraConfig:
        return check_trajectory_fits(self)


class DetectionTaskVectorConfig(StageConfig):
    """The condition of a detection task."""

    source: Literal["hidden_state", "clip_text", "clip_image"] = Field(
        "hidden_state",
        description="'hidden_state': the detector's last hidden layer averaged over the task's training samples "
        "(MTCNN: O-Net prelu5 on ground-truth face crops; DETR-like: mean decoder output; Florence-2: the decoder's "
        "last layer at the last time step of the teacher-forced answer, as in the paper). 'clip_text': CLIP text "
        "embedding of the task description. 'clip_image': mean CLIP image embedding of the task's training images.",
    )
    hidden_from: Literal["finetuned", "base"] = Field(
        "finetuned", description="Detector whose hidden layer is read: the task's fine-tuned one (paper) or the base."
    )
    num_samples: int = Field(64, ge=1, description="Samples averaged (crops for MTCNN, images otherwise).")
    clip_model: str = Field("ViT-B-32", description="open_clip model name (architecture) for the CLIP sources.")
    clip_checkpoint: str | None = Field(
        None, description="Path of the CLIP weights (open_clip checkpoint file). Required for the CLIP sources."
    )
    seed: int = Field(0, description="Seed that picks the samples.")


class DetectionEvalConfig(StageConfig):
    """COCO evaluation of a detector on a task's test split."""

    methods: tuple[str, ...] = Field(
        ("base", "lora", "model_soup", "cond_pdiff", "icm_lora"),
        min_length=1,
        description="Methods compared: base (original model), lora (original LoRA), model_soup (Model Soup), "
        "cond_pdiff (COND P-DIFF), icm_lora (the generated adapter); the reference points trajectory_mean and "
        "soup_own and the cond_pdiff_shared variant can be added.",
    )

    @field_validator("methods")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = set(METHOD_NAMES)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; known: {sorted(known)}")
        return value


def _detection_cvae() -> CVAEConfig:
    # The detector's LoRA is ~11.5k weights (vs 30k for the language demo); the official plan still fits.
    return CVAEConfig(epochs=200)


class DetectionRunConfig(StageConfig):
    """All stage configs of one detection run. The defaults are the CPU face-detection comparison."""

    data: DetectionDataConfig = Field(default_factory=DetectionDataConfig, description="Tasks and images.")
    detector: DetectorConfig = Field(default_factory=DetectorConfig, description="Base detector.")
    lora: DetectionLoraConfig = Field(default_factory=DetectionLoraConfig, description="Per-task LoRA fine-tuning.")
    task_vector: DetectionTaskVectorConfig = Field(
        default_factory=DetectionTaskVectorConfig, description="Task vectors."
    )
    cvae: CVAEConfig = Field(default_factory=_detection_cvae, description="The ICM-LoRA generator.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Adapter sampling.")
    soup: SoupConfig = Field(default_factory=SoupConfig, description="The Model Soup baseline.")
    pdiff: PDiffConfig = Field(default_factory=PDiffConfig, description="The COND P-DIFF baseline.")
    eval: DetectionEvalConfig = Field(default_factory=DetectionEvalConfig, description="Methods and evaluation.")
    resume: ResumeConfig = Field(
        default_factory=ResumeConfig, description="How often long stages save resumable state (not in cache keys)."
    )

    @model_validator(mode="after")
    def _task_names(self) -> DetectionRunConfig:
        for name in self.data.tasks:
            validate_category_name(_slug(name), "data.tasks")
        return self


def _slug(name: str) -> str:
    """Task name as a folder/category name (COCO labels may hold spaces or capitals)."""
    import re

    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "task"


task_slug = _slug
