"""Face-detection task categories built from real photos: LFW faces pasted onto real backgrounds under a
distinct imaging condition per category, with exact ground-truth boxes, written as COCO JSON.

Sources ship inside scikit-image's wheel (``skimage/data``): 100 LFW face crops (``lfw_subset.npy``,
25x25 grey) and real photographs used as backgrounds (grass, brick, gravel, rocket, coffee, moon,
motorcycle, Hubble deep field, horse, coins). Backgrounds that show people (astronaut, camera) or an
animal face (chelsea) are left out so a detection there is never an unlabelled true face. Faces 0-69
build train images, faces 70-99 test images, so test faces are unseen identities. The ground-truth box
of a face is the pasted square, exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


BACKGROUNDS = (
    "grass.png",
    "brick.png",
    "gravel.png",
    "rocket.jpg",
    "coffee.png",
    "moon.png",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "horse.png",
    "coins.png",
)
TRAIN_FACES = range(0, 70)
TEST_FACES = range(70, 100)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma=(sigma, sigma, 0))


def _blur(image, faces, rng):
    return _gaussian_blur(image, rng.uniform(2.0, 3.0))


def _dark(image, faces, rng):
    # Under-exposure: most of the range is lost, then sensor noise on what is left.
    dim = image * rng.uniform(0.12, 0.2)
    return dim + rng.normal(0, 2.0, image.shape)


def _noise(image, faces, rng):
    return image + rng.normal(0, rng.uniform(40, 55), image.shape)


def _occluded(image, faces, rng):
    # A flat patch (a scarf / a hand) over the lower or upper part of every face.
    out = image.copy()
    for x, y, s in faces:
        cover = int(round(s * rng.uniform(0.4, 0.5)))
        colour = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            out[y + s - cover : y + s, x : x + s] = colour
        else:
            out[y : y + cover, x : x + s] = colour
    return out


def _low_contrast(image, faces, rng):
    # Fog / haze: contrast squeezed towards a bright grey.
    keep = rng.uniform(0.2, 0.3)
    return image * keep + 200 * (1 - keep)


@dataclass(frozen=True)
class Condition:
    """One detection task: how its images are degraded, and a one-line description (for text task vectors)."""

    name: str
    description: str
    apply: Callable[[np.ndarray, list[tuple[int, int, int]], np.random.Generator], np.ndarray]


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("blur", "out-of-focus photos: faces under strong Gaussian blur", _blur),
        Condition("dark", "under-exposed photos taken in very low light, with sensor noise", _dark),
        Condition("noise", "photos with heavy Gaussian pixel noise", _noise),
        Condition("occluded", "faces half covered by a flat occluder such as a scarf or a hand", _occluded),
        Condition("haze", "low-contrast hazy photos, as through fog", _low_contrast),
    )
}


def _background_images() -> dict[str, np.ndarray]:
    from PIL import Image

    folder = skimage_data_folder()
    out = {}
    for name in BACKGROUNDS:
        with Image.open(folder / name) as handle:
            img = np.asarray(handle.convert("RGB"), dtype=np.float64)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.max() <= 1.0:
            img = img * 255.0
        out[name] = img[:, :, :3]
    return out


def skimage_data_folder() -> Path:
    """scikit-image's ``skimage/data`` folder (real photos and LFW faces ship there)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed; its skimage/data folder holds the face images")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def lfw_faces() -> np.ndarray:
    """The 100 LFW face crops of scikit-image's ``lfw_subset`` as float 0..255 [100, 25, 25]."""
    path = skimage_data_folder() / "lfw_subset.npy"
    return np.asarray(np.load(path, allow_pickle=False)[:100], dtype=np.float64) * 255.0


def _resize(face: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(face, (size, size), order=1, anti_aliasing=True, preserve_range=True)


def _place(size: int, sizes: list[int], rng: np.random.Generator, margin: int = 4) -> list[tuple[int, int, int]]:
    """(x, y, size) of non-overlapping squares inside a size x size image; squares that do not fit are dropped."""
    placed: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(200):
            x, y = int(rng.integers(margin, size - s - margin + 1)), int(rng.integers(margin, size - s - margin + 1))
            if all(
                x + s + margin <= px or px + ps + margin <= x or y + s + margin <= py or py + ps + margin <= y
                for px, py, ps in placed
            ):
                placed.append((x, y, s))
                break
        # A face that finds no free spot is left out (the first one always fits).
    return placed


@dataclass(frozen=True)
class FaceSceneSpec:
    """How the images of a face-detection split are drawn."""

    image_size: int = 160
    min_face: int = 36
    max_face: int = 60
    max_faces: int = 2


def render_split(
    condition: Condition, split: str, num_images: int, spec: FaceSceneSpec, seed: int
) -> tuple[list[np.ndarray], list[list[tuple[int, int, int]]]]:
    """Render ``num_images`` uint8 images of one condition and split; returns (images, faces as (x, y, size))."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    key = f"{condition.name}/{split}/{seed}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    faces = lfw_faces()
    pool = list(TRAIN_FACES if split == "train" else TEST_FACES)
    backgrounds = _background_images()
    names = sorted(backgrounds)
    images, boxes = [], []
    for _ in range(num_images):
        bg = backgrounds[names[int(rng.integers(len(names)))]]
        s = spec.image_size
        top, left = int(rng.integers(0, bg.shape[0] - s + 1)), int(rng.integers(0, bg.shape[1] - s + 1))
        canvas = bg[top : top + s, left : left + s].copy()
        sizes = [
            int(rng.integers(spec.min_face, spec.max_face + 1))
            for _ in range(int(rng.integers(1, spec.max_faces + 1)))
        ]
        placed = []
        for x, y, size in _place(s, sizes, rng):
            face = _resize(faces[pool[int(rng.integers(len(pool)))]], size)
            canvas[y : y + size, x : x + size] = face[:, :, None]
            placed.append((x, y, size))
        image = np.clip(condition.apply(canvas, placed, rng), 0, 255).round().astype(np.uint8)
        images.append(image)
        boxes.append(placed)
    return images, boxes


def coco_dataset(
    file_names: list[str], sizes: list[tuple[int, int]], faces: list[list[tuple[int, int, int]]], info: dict[str, Any]
) -> dict[str, Any]:
    """A COCO detection dict with one category ('face', id 1); boxes are [x, y, w, h]."""
    images, annotations = [], []
    for image_id, (name, (h, w), placed) in enumerate(zip(file_names, sizes, faces, strict=True), start=1):
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for x, y, s in placed:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [float(x), float(y), float(s), float(s)],
                    "area": float(s * s),
                    "iscrowd": 0,
                }
            )
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "face", "supercategory": "person"}],
    }
