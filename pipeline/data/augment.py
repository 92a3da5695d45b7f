"""Replayable augmented views: what extract caches the teacher on, and the student later sees, pixel for pixel.

View 0 of an image is its plain image (the eval geometry of its `Preprocessing`). View v >= 1 is drawn from a
registered policy with a seed per (image, view), and its parameters, a crop box and a flip, are **stored** with the
targets (`cache.store`), then replayed with them: stored parameters survive library upgrades, seeds alone do not
(torchvision's samplers, its antialias default). Every view's pixels come from `replay`, whoever asks (extract, distill,
the online teacher, verify), with interpolation and antialiasing pinned in the recorded augmentation. A policy is one
registered function: its settings in, a `Policy` (its canvas and its draw) out.

    crop               pad the served image by `padding` (zeros), crop the served size at random (digits, text)
    crop-flip          the same, flipped horizontally with probability `flip` (CIFAR's recipe)
    resized-crop-flip  a box of `scale` of the area and `ratio` of aspect from the decoded image, resized to the
                       served size, then flipped (ImageNet's RandomResizedCrop)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import RandomCrop, RandomResizedCrop
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..errors import UserError
from ..registry import Registry
from .datasets import Preprocessing, SplitData

POLICIES: Registry = Registry("augmentation policy")
PARAMS = ("top", "left", "height", "width", "flip")  # a view's stored parameters: its box on the canvas, its flip
PLAIN = np.full(len(PARAMS), -1, dtype=np.int32)  # view 0's: none, the eval geometry


@dataclass(frozen=True)
class Policy:
    """Where a policy's box lies, and how it is drawn: `draw(canvas_height, canvas_width, size)` ->
    (top, left, height, width, flip), from torch's CPU generator (seeded per image and view by the caller).

    The canvas is `padded` (the eval-geometry image padded by `padding` zeros) or `decoded` (the image as decoded,
    before any resize: a box there is resized to the served size)."""

    canvas: str
    draw: Callable[[int, int, int], tuple[int, int, int, int, bool]]
    padding: int = 0


def _flip(probability: float) -> bool:
    return bool(torch.rand(1).item() < probability)


def _random_crop(height: int, width: int, size: int, flip: float) -> tuple[int, int, int, int, bool]:
    top, left, h, w = RandomCrop.get_params(_shape(height, width), (size, size))
    return top, left, h, w, _flip(flip)


def _random_resized_crop(
    height: int, width: int, size: int, scale: tuple[float, float], ratio: tuple[float, float], flip: float
) -> tuple[int, int, int, int, bool]:
    top, left, h, w = RandomResizedCrop.get_params(_shape(height, width), list(scale), list(ratio))
    return top, left, h, w, _flip(flip)


def _shape(height: int, width: int) -> torch.Tensor:
    """A tensor of the canvas's shape and no storage: torchvision's samplers read only its size."""
    return torch.empty(()).expand(1, height, width)


def _probability(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise UserError(f"augmentation setting {name} must be in [0, 1], not {value:g}")
    return value


def _padding(value: int) -> int:
    if value < 0:
        raise UserError(f"augmentation setting padding must be >= 0, not {value}")
    return value


def _range(name: str, value: tuple[float, float], upper: float | None) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high or (upper is not None and high > upper):
        bound = f" <= {upper:g}" if upper is not None else ""
        raise UserError(f"augmentation setting {name} must be two numbers 0 < low <= high{bound}, not {list(value)}")
    return value


@POLICIES.register(name="crop")
def crop(padding: int = 4) -> Policy:
    """Pad by `padding` zeros, crop the served size at random; no flip (digits, text-like data)."""
    return Policy("padded", partial(_random_crop, flip=0.0), _padding(padding))


@POLICIES.register(name="crop-flip")
def crop_flip(padding: int = 4, flip: float = 0.5) -> Policy:
    """Pad by `padding` zeros, crop the served size at random, flip horizontally with probability `flip`."""
    return Policy("padded", partial(_random_crop, flip=_probability("flip", flip)), _padding(padding))


@POLICIES.register(name="resized-crop-flip")
def resized_crop_flip(
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5
) -> Policy:
    """A box of `scale` of the decoded image's area and `ratio` of aspect, resized to the served size, flipped
    with probability `flip`."""
    draw = partial(
        _random_resized_crop,
        scale=_range("scale", scale, 1.0),
        ratio=_range("ratio", ratio, None),
        flip=_probability("flip", flip),
    )
    return Policy("decoded", draw)


def policy_defaults(name: str) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(POLICIES.get(name)).parameters.items()}


def _convert(name: str, value: Any, default: Any) -> Any:
    """A setting given in YAML or on the command line, as the type of its default (int, float, pair of floats)."""
    numbers = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        if isinstance(value, (list, tuple)) and len(value) == len(default):
            return tuple(_convert(name, v, 0.0) for v in value)
    elif isinstance(default, int) and numbers and float(value).is_integer():
        return int(value)
    elif isinstance(default, float) and numbers:
        return float(value)
    kind = f"a list of {len(default)} numbers" if isinstance(default, tuple) else type(default).__name__
    raise UserError(f"augmentation setting {name} must be {kind}, not {value!r}")


@dataclass(frozen=True)
class Augmentation:
    """A policy with every setting (defaults filled in) and the pinned resampling: what a store or a run records,
    and all that replaying a view needs besides its parameters."""

    policy: str
    settings: dict[str, Any] = field(default_factory=dict)
    interpolation: str = "bilinear"
    antialias: bool = True

    @classmethod
    def create(cls, policy: str, kwargs: Mapping[str, Any] | None, preprocessing: Preprocessing) -> Augmentation:
        """The policy `policy` with `kwargs` (its settings, plus `interpolation` and `antialias`, which default to
        the preprocessing's interpolation and True), each checked."""
        defaults = policy_defaults(policy)
        given = dict(kwargs or {})
        interpolation = str(given.pop("interpolation", preprocessing.interpolation))
        if interpolation not in {m.value for m in InterpolationMode}:
            raise UserError(f"augmentation setting interpolation: unknown mode {interpolation!r}")
        antialias = given.pop("antialias", True)
        if not isinstance(antialias, bool):
            raise UserError(f"augmentation setting antialias must be true or false, not {antialias!r}")
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            takes = ", ".join([*defaults, "interpolation", "antialias"])
            raise UserError(f"augmentation {policy!r} has no setting {unknown[0]!r}; it takes {takes}")
        settings = {n: _convert(n, given[n], d) if n in given else d for n, d in defaults.items()}
        augmentation = cls(policy, settings, interpolation, antialias)
        augmentation.build()  # every setting's range is checked here, before any work
        return augmentation

    def build(self) -> Policy:
        return POLICIES.get(self.policy)(**self.settings)

    def record(self) -> dict[str, Any]:
        """Policy, settings and resampling as plain JSON values (a store's identity, a run's spec)."""
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()}
        return {
            "policy": self.policy,
            "settings": settings,
            "interpolation": self.interpolation,
            "antialias": self.antialias,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Augmentation:
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in record["settings"].items()}
        return cls(record["policy"], settings, record["interpolation"], record["antialias"])

    def describe(self) -> str:
        settings = ", ".join(f"{k} {v}" for k, v in self.record()["settings"].items())
        antialias = "antialiased" if self.antialias else "not antialiased"
        return f"{self.policy} ({settings}; {self.interpolation}, {antialias})"


def view_seed(seed: int, index: int, view: int) -> int:
    """The seed of one image's view: a function of the run's seed, the image's stable index and the view alone, so
    a view's parameters do not depend on which other images or views are drawn."""
    return int(np.random.SeedSequence([seed, index, view]).generate_state(1)[0])


class Replay:
    """The one way a view's pixels are made: `replay(decoded, params)` -> uint8 (C, size, size)."""

    def __init__(self, preprocessing: Preprocessing, augmentation: Augmentation | None) -> None:
        self.preprocessing, self.augmentation = preprocessing, augmentation
        self.policy = augmentation.build() if augmentation else None
        self.geometry = preprocessing.geometry()

    def canvas(self, decoded: torch.Tensor, plain: torch.Tensor | None = None) -> torch.Tensor:
        """The image a view's box is drawn on: the padded eval-geometry image (`plain`, when already made), or the
        decoded image itself."""
        if self.policy.canvas == "decoded":
            return decoded
        pad = self.policy.padding
        return F.pad(self.geometry(decoded) if plain is None else plain, [pad, pad, pad, pad], fill=0)

    def draw(self, canvas: torch.Tensor, seed: int) -> np.ndarray:
        """A view's parameters drawn on `canvas` from `seed` (the caller forks torch's CPU random state)."""
        torch.default_generator.manual_seed(seed)
        return np.array(self.policy.draw(*canvas.shape[-2:], self.preprocessing.input_size), dtype=np.int32)

    def __call__(self, canvas: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        """The view with `params` of the image whose canvas is `canvas`."""
        top, left, height, width, flip = (int(v) for v in params)
        size = self.preprocessing.input_size
        mode = InterpolationMode(self.augmentation.interpolation)
        view = F.resized_crop(canvas, top, left, height, width, [size, size], mode, self.augmentation.antialias)
        return F.horizontal_flip(view) if flip else view


class ViewImages(Dataset):
    """A split's images under views, addressed by key (row, view); returns (image, label, row, params).

    Row r is dataset sample `indices[r]` (a store's rows; default: the dataset's own order). View 0 is the plain
    image; view v >= 1 replays `stored[v][r]` (the parameters a store holds) or, without stored parameters, draws
    them from `view_seed(seed, index, v)`; either way `params` says what was applied (PLAIN for view 0). Images
    are normalised float32, pixels made by `Replay`.
    """

    def __init__(
        self,
        data: SplitData,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        indices: np.ndarray | None = None,
        stored: Mapping[int, np.ndarray] | None = None,
    ) -> None:
        self.data, self.decoded = data, data.decoded()
        self.replay = Replay(data.preprocessing, augmentation)
        self.normalize = data.preprocessing.normalize()
        self.seed = seed
        self.indices = np.arange(len(data)) if indices is None else np.asarray(indices)
        self.stored = dict(stored or {})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int, np.ndarray]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, int, int, np.ndarray]]:
        rows = [int(row) for row, _ in keys]
        views = [int(view) for _, view in keys]
        indices = [int(self.indices[row]) for row in rows]
        decoded = [image for image, _ in self.decoded.__getitems__(indices)]
        pixels, params = self._views(decoded, rows, views, indices)
        images = self.normalize(torch.stack(pixels)).unbind(0)
        labels = self.data.labels[indices]
        return [(img, int(lab), row, p) for img, lab, row, p in zip(images, labels, rows, params, strict=True)]

    def _views(
        self, decoded: list[torch.Tensor], rows: list[int], views: list[int], indices: list[int]
    ) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        plain = self._plain(decoded, views)
        pixels, params = [], []
        with torch.random.fork_rng(devices=[]):  # drawing must not move anyone's random stream
            for i, (image, row, view, index) in enumerate(zip(decoded, rows, views, indices, strict=True)):
                if view == 0:
                    pixels.append(plain[i])
                    params.append(PLAIN)
                    continue
                if self.replay.augmentation is None:
                    raise ValueError(f"view {view} asked of images without an augmentation")
                canvas = self.replay.canvas(image, plain[i])
                if view in self.stored:
                    drawn = self.stored[view][row]
                else:
                    drawn = self.replay.draw(canvas, view_seed(self.seed, index, view))
                pixels.append(self.replay(canvas, drawn))
                params.append(drawn)
        return pixels, params

    def _plain(self, decoded: list[torch.Tensor], views: list[int]) -> list[torch.Tensor | None]:
        """The eval geometry of the images that need it (view 0, or a padded policy's canvas), as one batch when
        they share a size (identical to image by image, and much faster for small in-memory images)."""
        padded = self.replay.policy is not None and self.replay.policy.canvas == "padded"
        wanted = [i for i, view in enumerate(views) if view == 0 or padded]
        out: list[torch.Tensor | None] = [None] * len(decoded)
        if not wanted:
            return out
        if len({decoded[i].shape for i in wanted}) == 1:
            batch = self.replay.geometry(torch.stack([decoded[i] for i in wanted])).unbind(0)
        else:
            batch = [self.replay.geometry(decoded[i]) for i in wanted]
        for i, image in zip(wanted, batch, strict=True):
            out[i] = image
        return out
