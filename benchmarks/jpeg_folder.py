"""Generated JPEG ImageFolders for the loading and two-pass benchmarks (P13, P14), made from the embedded digits.

Each image is one of scikit-learn's 8×8 digits, upscaled (bilinear) to about 60 % of the image's shorter side at a
random place, in a random colour over a random colour texture (a 4×4 grid of colours and a finer one, a cell per
8 pixels at ±40 of 255, both upscaled bicubic), with Gaussian pixel noise (σ 16 of 255), so that JPEG has detail to
encode: at quality 90 about 0.5 bytes a pixel (ImageNet's photos: about 0.7) rather than the few KiB of flat areas.
Seeded: the same arguments give the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NOISE_SIGMA = 16.0  # of 255
FINE_CELL, FINE_AMPLITUDE = 8, 40.0  # pixels per cell of the fine texture, and its swing (of 255)
DIGIT_FRACTION = 0.6  # the digit's side against the image's shorter side


def write_digit_folder(
    root: Path, per_class: dict[str, int], sizes: tuple[tuple[int, int], tuple[int, int]], quality: int, seed: int = 0
) -> int:
    """Writes `root/<split>/<digit>/<n>.jpg`, `per_class[split]` images of each of the 10 digits per split, each
    (width, height) drawn uniformly from `sizes` ((min_w, max_w), (min_h, max_h)); returns the bytes written."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    written = 0
    for split, count in per_class.items():
        for label in range(10):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            members = np.flatnonzero(digits.target == label)
            for n, index in enumerate(rng.choice(members, count)):
                size = (int(rng.integers(*sizes[0], endpoint=True)), int(rng.integers(*sizes[1], endpoint=True)))
                path = folder / f"{n:05d}.jpg"
                digit_image(pixels[index], size, rng).save(path, quality=quality)
                written += path.stat().st_size
    return written


def digit_image(digit: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One 8×8 grey digit drawn at `size` (width, height) over a smooth texture, with noise."""
    width, height = size
    texture = smooth_noise((4, 4), size, rng)
    fine = smooth_noise((max(2, height // FINE_CELL), max(2, width // FINE_CELL)), size, rng)
    texture = np.clip(texture + (fine - 127.5) * (FINE_AMPLITUDE / 127.5), 0, 255)
    side = int(DIGIT_FRACTION * min(size))
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR), dtype=np.float32)[..., None] / 255
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    colour = rng.integers(0, 256, 3).astype(np.float32)
    patch = texture[top : top + side, left : left + side]
    texture[top : top + side, left : left + side] = patch * (1 - ink) + colour * ink
    noisy = texture + rng.normal(0.0, NOISE_SIGMA, texture.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def smooth_noise(grid: tuple[int, int], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random colours on a (rows, columns) grid, upscaled bicubic to `size` (width, height): float32 (h, w, 3)."""
    cells = Image.fromarray(rng.integers(0, 256, (*grid, 3), dtype=np.uint8))
    return np.asarray(cells.resize(size, Image.BICUBIC), dtype=np.float32)
