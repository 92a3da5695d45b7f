"""Replayable augmented views: the policies' draws, one replay for every stage (the student sees the teacher's pixels
byte for byte), the cache of views and the epochs drawn from it, and the live teacher's agreement with it."""

from __future__ import annotations

import importlib
import shutil

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from cache.reader import CachedTargets
from cache.store import FeatureStore
from helpers import STUDENT, assert_one_line_error, interrupted_in_epoch, run_cli, small_chunks
from pipeline import DistillConfig, ExtractConfig, distill, extract
from pipeline.data.augment import PLAIN, Augmentation, Replay, ViewImages
from pipeline.data.datasets import load_split
from pipeline.distillation.methods import Distiller
from pipeline.engine.training import Trainer

TAPS = ("layer2.2", "layer3.2")
VIEWS = 3
RUN = {**STUDENT, "method": "feature-standard", "teacher_layers": TAPS, "student_layers": ("layer2.0", "layer3.0")}


def _extract(out, checkpoint, **views) -> FeatureStore:
    with small_chunks():  # several blocks per view
        extract(ExtractConfig(out=str(out), checkpoint=checkpoint, layers=TAPS, max_samples=200, device="cpu", **views))
    return FeatureStore.open(out)


@pytest.fixture(scope="module")
def stores(digits_teacher, tmp_path_factory):
    """A 3-view crop-flip store and its plain twin (same teacher, taps and 200 rows)."""
    root = tmp_path_factory.mktemp("views")
    checkpoint = digits_teacher["checkpoint"]
    viewed = _extract(root / "views", checkpoint, views=VIEWS, augment="crop-flip")
    return viewed, _extract(root / "plain", checkpoint)


@pytest.fixture(scope="module")
def digits():
    return load_split("digits", "train")


def test_crop_policies_draw_inside_the_padded_image_and_replay_as_slices(digits):
    """A crop's box is the served size, anywhere in the image padded by `padding`, and its pixels are that slice of
    the zero-padded plain image (flipped when drawn so); `crop` never flips, `crop-flip` about half the time."""
    flip = Augmentation.create("crop-flip", {"padding": 3}, digits.preprocessing)
    replay = Replay(digits.preprocessing, flip)
    decoded = digits.decoded()[5][0]
    plain = digits.preprocessing.geometry()(decoded)
    padded = np.pad(plain.numpy(), ((0, 0), (3, 3), (3, 3)))
    flips = []
    for seed in range(200):
        canvas = replay.canvas(decoded)
        top, left, height, width, flipped = replay.draw(canvas, seed)
        assert (height, width) == (32, 32) and 0 <= top <= 6 and 0 <= left <= 6
        expected = padded[:, top : top + 32, left : left + 32]
        expected = expected[:, :, ::-1] if flipped else expected
        assert np.array_equal(replay(canvas, np.array([top, left, height, width, flipped])).numpy(), expected)
        flips.append(flipped)
    assert 70 < sum(flips) < 130
    crop = Replay(digits.preprocessing, Augmentation.create("crop", None, digits.preprocessing))
    assert not any(crop.draw(crop.canvas(decoded), seed)[4] for seed in range(50))


def test_resized_crop_boxes_lie_in_the_decoded_image_within_scale_and_ratio(digits):
    settings = {"scale": [0.25, 0.75], "ratio": [0.5, 2.0], "flip": 0.0}
    replay = Replay(digits.preprocessing, Augmentation.create("resized-crop-flip", settings, digits.preprocessing))
    decoded = torch.zeros(3, 40, 60, dtype=torch.uint8)  # a decoded image of its own size, before any resize
    for seed in range(100):
        top, left, height, width, flipped = replay.draw(replay.canvas(decoded), seed)
        assert 0 <= top and top + height <= 40 and 0 <= left and left + width <= 60 and not flipped
        assert 0.25 * 0.9 <= height * width / 2400 <= 0.75 * 1.1 and 0.5 * 0.8 <= width / height <= 2.0 * 1.25
        assert replay(decoded, np.array([top, left, height, width, 0])).shape == (3, 32, 32)


def test_a_views_parameters_depend_on_its_image_and_view_alone(digits):
    """Drawn in any batch, in any order, with any neighbours, (image, view) gets the same parameters and pixels,
    and view 0 is the plain image the un-augmented pipeline serves."""
    images = ViewImages(digits, Augmentation.create("crop-flip", None, digits.preprocessing), seed=7)
    alone = images[(5, 2)]
    crowd = {row: item for row, item in zip([9, 5, 3], images.__getitems__([(9, 1), (5, 2), (3, 2)]), strict=True)}
    assert np.array_equal(alone[3], crowd[5][3]) and torch.equal(alone[0], crowd[5][0])
    assert not np.array_equal(crowd[3][3], crowd[5][3])  # another image, the same view: another draw
    assert not np.array_equal(images[(5, 1)][3], alone[3])  # the same image, another view
    plain, _, _, params = images[(5, 0)]
    assert np.array_equal(params, PLAIN) and torch.equal(plain, digits[5][0])
    assert not torch.equal(ViewImages(digits, images.replay.augmentation, seed=8)[(5, 2)][0], alone[0])  # another run


@pytest.mark.slow  # extracts and trains: the full suite runs it
def test_the_student_sees_exactly_the_pixels_the_teacher_was_cached_on(digits_teacher, tmp_path, monkeypatch):
    """Extract's teacher inputs and distill's student inputs, per (row, view), are equal byte for byte."""
    extract_module = importlib.import_module(
        "pipeline.stages.extract"
    )  # `pipeline.stages.extract` is the stage's function
    teacher_inputs: list[torch.Tensor] = []

    class Recording(extract_module.TapRecorder):
        def run(self, x):
            teacher_inputs.append(x.clone())
            return super().run(x)

    monkeypatch.setattr(extract_module, "TapRecorder", Recording)
    store = _extract(tmp_path / "store", digits_teacher["checkpoint"], views=VIEWS, augment="crop-flip")
    num_rows = store.split("train").num_samples
    cached = torch.cat(teacher_inputs).reshape(VIEWS, num_rows, 3, 32, 32)  # view by view, rows in order

    keys, student_inputs = [], []
    plan, forward = Trainer.epoch_plan, Distiller.forward
    monkeypatch.setattr(Trainer, "epoch_plan", lambda self, e: keys.append(plan(self, e)[2]) or plan(self, e))
    monkeypatch.setattr(
        Distiller, "forward", lambda self, x, b: student_inputs.append(x.clone()) or forward(self, x, b)
    )
    distill(DistillConfig(store=str(tmp_path / "store"), out=str(tmp_path / "run"), **{**RUN, "batch_size": 50}))
    served = torch.cat(student_inputs)
    shown = np.concatenate([k[: len(k) - len(k) % 50] for k in keys])
    assert len(np.unique(shown[:, 1])) == VIEWS  # every view was drawn
    for (row, view), image in zip(shown, served, strict=True):
        assert image.numpy().tobytes() == cached[view, row].numpy().tobytes()


@pytest.mark.slow  # extracts and trains: the full suite runs it
def test_view_zero_is_the_plain_store_and_one_view_trains_as_it(stores, tmp_path):
    """The views store's view 0 holds the plain store's bytes, and distilling on it alone (`--views 1`) gives the
    plain store's weights bit for bit: views change nothing until they are drawn."""
    viewed, plain = stores
    for path in ("features/layer2.2", "features/layer3.2", "labels", "indices", "logits"):
        assert viewed.split("train").read(path).tobytes() == plain.split("train").read(path).tobytes()
    for name, store, views in (("plain", plain, None), ("one", viewed, 1)):
        distill(DistillConfig(store=str(store.path), out=str(tmp_path / name), views=views, **RUN))
    one, base = (load_file(tmp_path / name / "student.safetensors") for name in ("one", "plain"))
    assert all(torch.equal(one[k], base[k]) for k in base)


def test_cached_views_are_served_with_their_own_targets_in_ram_and_streamed(stores):
    """Each served row's targets are its drawn view's; in RAM rows draw views one by one, streamed a block's rows
    share one view, so that every read is whole chunks of one view."""
    part = stores[0].split("train")
    assert part.num_blocks >= 2
    views = [{p: v.read(p) for p in ("features/layer3.2", "logits")} for v in part.views()]
    labels = part.read("labels")
    for memory in (1 << 40, 0):
        targets = CachedTargets(part, ["features/layer3.2", "logits", "labels"], memory, window=1, views=VIEWS)
        rng = np.random.default_rng(0)
        windows = targets.epoch_order(rng)
        draws = targets.view_draws(windows, rng)
        for rows, row_views, (features, logits, batch_labels) in targets.batches(windows, 20, draws):
            for k, (row, view) in enumerate(zip(rows, row_views, strict=True)):
                assert np.array_equal(features[k], views[view]["features/layer3.2"][row])
                assert np.array_equal(logits[k], views[view]["logits"][row])
            assert np.array_equal(batch_labels, labels[rows])
        order, drawn = np.concatenate(windows), np.concatenate(draws)
        per_block = [len(np.unique(drawn[order // part.block_rows == b])) for b in range(part.num_blocks)]
        assert max(per_block) == (VIEWS if memory else 1)


@pytest.mark.slow  # extracts and trains: the full suite runs it
def test_a_run_on_views_resumes_exactly(stores, tmp_path, monkeypatch):
    settings = {**RUN, "epochs": 3, "checkpoint_seconds": 0.0}
    store = str(stores[0].path)
    distill(DistillConfig(store=store, out=str(tmp_path / "whole"), **settings))
    with interrupted_in_epoch(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(store=store, out=str(tmp_path / "cut"), **settings))
    summary = distill(DistillConfig(store=store, out=str(tmp_path / "cut"), resume=True, **settings))
    assert summary["augmentation"]["views"] == VIEWS and summary["augmentation"]["policy"] == "crop-flip"
    whole, cut = (load_file(tmp_path / run / "student.safetensors") for run in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_recompute_agrees_with_the_cache_and_catches_views_replayed_wrong(stores, tmp_path):
    """The live teacher on views replayed from the store matches every cached view (cosine >= 0.999); with two
    views' parameters swapped, the replayed pixels are not those cached and the check fails, naming the view."""
    store = stores[0].path
    result = run_cli("verify", store, "--recompute", 16, "--device", "cpu")
    assert "every cosine >= 0.999" in result.output
    assert {tuple(line.split()[:3]) for line in result.output.splitlines()} >= {("train", "2", "features/layer3.2")}
    swapped = tmp_path / "swapped.zarr"
    shutil.copytree(store, swapped)
    params = [zarr.open_array(str(swapped / "train" / "views" / str(v) / "params"), mode="r+") for v in (1, 2)]
    first, second = params[0][:], params[1][:]
    params[0][:], params[1][:] = second, first
    failed = run_cli("verify", swapped, "--recompute", 16, "--device", "cpu", expect_ok=False)
    assert_one_line_error(failed, "disagree with the live teacher", "view ")


def test_info_shows_the_views_and_their_sizes(stores):
    text = run_cli("info", stores[0].path).output
    assert "views       3 per training image: view 0 plain, 1..2 crop-flip (padding 4, flip 0.5" in text
    assert "view 1 (views/1/, with params)" in text and "view 2 (views/2/, with params)" in text


def test_the_size_check_counts_every_view(stores, digits_teacher, tmp_path):
    """The raw size extract checks before writing is the views store's, not its view 0's: a cap just below it is
    refused before anything is written."""
    viewed = stores[0]
    raw = sum(a.nbytes for part in viewed.splits() for view in part.views() for a in view.arrays().values())
    args = ["extract", "--checkpoint", digits_teacher["checkpoint"], "--layers", ",".join(TAPS), "--max-samples", 200]
    args += ["--views", VIEWS, "--augment", "crop-flip", "--device", "cpu", "--out", tmp_path]
    refused = run_cli(*args, "--max-store-gb", raw * 0.999 / 2**30, expect_ok=False)
    assert_one_line_error(refused, "would hold", "above --max-store-gb")
    assert not (tmp_path / "features.zarr").exists()
