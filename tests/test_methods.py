"""The methods' losses against hand computations, the feature method's projector and alignment, default taps."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from helpers import assert_one_line_error, run_cli
from pipeline.config import DistillConfig, resolve
from pipeline.distillation.losses import TermSetup
from pipeline.distillation.methods import METHODS, Distiller, cached_inputs, get_method
from pipeline.errors import UserError
from pipeline.models.taps import Tap, list_taps
from pipeline.models.zoo import create_model


def test_taps_pair_one_to_one():
    with pytest.raises(UserError, match="pair one-to-one"):
        Distiller(create_model("resnet8", 10), get_method("feature"), TermSetup([], [Tap(1, "a", (16, 32, 32))]))


def test_distiller_stops_after_last_tap_and_trains_nothing_after():
    net = create_model("resnet8", 10)
    taps = list_taps(net, 32, names=["layer1.0", "layer2.0"])
    teacher = [Tap(0, "a", (32, 16, 16)), Tap(1, "b", (64, 8, 8))]
    distiller = Distiller(net, get_method("feature"), TermSetup(taps, teacher))
    batch = {"features/a": torch.randn(2, 32, 16, 16), "features/b": torch.randn(2, 64, 8, 8)}
    _, losses = distiller(torch.randn(2, 3, 32, 32), batch)
    losses["feature_mse"].backward()
    assert net.stem[0].weight.grad is not None and net.layer2[0].conv1.weight.grad is not None
    assert net.layer3[0].conv1.weight.grad is None and net.fc.weight.grad is None


def _identity_pair_distiller(method: str, losses: dict | None = None) -> Distiller:
    """resnet8 (width 8) with one tap at layer3.0 (32×8×8) paired to a same-shaped teacher tap, identity projector."""
    net = create_model("resnet8", 4, model_kwargs={"base_width": 8})
    method_ = get_method(method).configured(losses or {})
    taps = list_taps(net, 32, names=["layer3.0"]) if method_.teacher_taps else []
    teacher = [Tap(0, "t", (32, 8, 8))] if taps else []
    distiller = Distiller(net, method_, TermSetup(taps, teacher))
    for pair in (pair for loss in distiller.losses.values() for pair in getattr(loss, "pairs", ())):
        with torch.no_grad():
            pair.projector.weight.copy_(torch.eye(32)[:, :, None, None])
    return distiller


def _batch(distiller: Distiller, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    full = {
        "labels": torch.tensor([0, 3]),
        "logits": torch.randn(2, 4, generator=g) * 3,
        "features/t": torch.randn(2, 32, 8, 8, generator=g).half(),
    }
    return torch.randn(2, 3, 32, 32, generator=g), {k: full[k] for k in distiller.inputs}


def _hand_kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """16·(1/B) Σ_b Σ_k p_t log(p_t / p_s), p = softmax(z / T), in float64 from the definition."""
    total = 0.0
    for s_row, t_row in zip(student.double().tolist(), teacher.double().tolist(), strict=True):
        p_s = [math.exp(v / t) for v in s_row]
        p_t = [math.exp(v / t) for v in t_row]
        p_s = [v / sum(p_s) for v in p_s]
        p_t = [v / sum(p_t) for v in p_t]
        total += sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    return t * t * total / len(student)


def _hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    rows = logits.double().tolist()
    return sum(math.log(sum(math.exp(v) for v in r)) - r[y] for r, y in zip(rows, labels.tolist(), strict=True)) / len(
        rows
    )


def test_what_each_method_reads():
    """Feature-only methods are never handed a label or logit; ce is never handed anything from the teacher."""
    reads = {name: cached_inputs(get_method(name), ["features/t"]) for name in METHODS.names()}
    assert reads == {
        "feature": ["features/t"],
        "feature-standard": ["features/t"],
        "ce": ["labels"],
        "kd": ["labels", "logits"],
        "fitnet": ["labels", "features/t"],
        "fitnet-kd": ["labels", "logits", "features/t"],
        "block-kd": ["labels", "logits"],
    }
    assert _identity_pair_distiller("fitnet").inputs == reads["fitnet"]


def test_ce_by_hand_and_never_touches_the_teacher():
    distiller = _identity_pair_distiller("ce")
    images, batch = _batch(distiller)
    assert set(batch) == {"labels"}
    output, losses = distiller(images, batch)
    assert set(losses) == {"ce"}
    assert losses["ce"].item() == pytest.approx(_hand_ce(output.logits, batch["labels"]), rel=1e-5)


def test_kd_by_hand_temperature_and_batch_mean():
    distiller = _identity_pair_distiller("kd")
    images, batch = _batch(distiller)
    output, losses = distiller(images, batch)
    assert set(losses) == {"ce", "kd"}
    assert losses["kd"].item() == pytest.approx(_hand_kd(output.logits, batch["logits"], 4.0), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(_hand_ce(output.logits, batch["labels"]), rel=1e-5)
    # KL of identical distributions is zero, whatever T; and T enters both as the softening and the T² weight.
    distiller = _identity_pair_distiller("kd", {"kd": {"temperature": 2.0}})
    images, batch = _batch(distiller)
    output, _ = distiller(images, batch)
    same = {**batch, "logits": output.logits.detach()}
    assert distiller(images, same)[1]["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert distiller(images, batch)[1]["kd"].item() == pytest.approx(
        _hand_kd(output.logits, batch["logits"], 2.0), rel=1e-5
    )


def test_fitnet_sums_ce_and_feature_mse_and_trains_everything():
    distiller = _identity_pair_distiller("fitnet")
    images, batch = _batch(distiller)
    output, losses = distiller(images, batch)
    assert set(losses) == {"ce", "feature_mse"} and output.logits is not None
    mse = ((output.features["layer3.0"] - batch["features/t"].float()) ** 2).mean().item()
    assert losses["feature_mse"].item() == pytest.approx(mse, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(_hand_ce(output.logits, batch["labels"]), rel=1e-5)
    sum(losses.values()).backward()
    assert distiller.student.fc.weight.grad is not None and distiller.student.stem[0].weight.grad is not None


def test_fitnet_kd_adds_the_kd_term():
    distiller = _identity_pair_distiller("fitnet-kd")
    images, batch = _batch(distiller)
    output, losses = distiller(images, batch)
    assert set(losses) == {"ce", "kd", "feature_mse"}
    assert losses["kd"].item() == pytest.approx(_hand_kd(output.logits, batch["logits"], 4.0), rel=1e-5)


def _hand_cosine_distance(student: torch.Tensor, teacher: torch.Tensor, per: str) -> float:
    """Mean of 1 − a·b / (|a| |b|) in float64 loops: over channels at each (sample, position), or over the whole
    flattened feature of each sample."""
    s, t = student.double(), teacher.double()
    if per == "sample":
        pairs = [(s[b].flatten().tolist(), t[b].flatten().tolist()) for b in range(len(s))]
    else:
        positions = [(b, i, j) for b in range(len(s)) for i in range(s.shape[2]) for j in range(s.shape[3])]
        pairs = [(s[b, :, i, j].tolist(), t[b, :, i, j].tolist()) for b, i, j in positions]
    distances = []
    for u, v in pairs:
        dot = sum(x * y for x, y in zip(u, v, strict=True))
        distances.append(1 - dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v))))
    return sum(distances) / len(distances)


@pytest.mark.parametrize("per", ["position", "sample"])
def test_cosine_feature_criterion_from_yaml_by_hand(tmp_path, per):
    """A second feature criterion with its own weight and setting, configured in YAML, reusing the alignment:
    `feature` with the MSE dropped and the cosine distance at weight 0.5 gives exactly 0.5 × the hand value."""
    path = tmp_path / "cosine.yaml"
    path.write_text(
        yaml.safe_dump({"distill": {"losses": {"feature_mse": 0, "feature_cosine": {"weight": 0.5, "per": per}}}})
    )
    config = resolve(DistillConfig, path, {"store": str(tmp_path)})
    distiller = _identity_pair_distiller("feature", config.losses)
    images, batch = _batch(distiller)
    output, losses = distiller(images, batch)
    assert set(losses) == {"feature_cosine"}
    student, teacher = output.features["layer3.0"], batch["features/t"].float()  # identity projector, same size
    assert losses["feature_cosine"].item() == pytest.approx(
        0.5 * _hand_cosine_distance(student, teacher, per), rel=1e-5
    )
    assert distiller.method.spec() == {"feature_cosine": {"weight": 0.5, "per": per, "eps": 1e-8}}


def test_cosine_feature_criterion_trains_and_refuses_bad_settings(scored_store, tmp_path):
    path = tmp_path / "cosine.yaml"
    path.write_text(yaml.safe_dump({"distill": {"losses": {"feature_cosine": 1.0}}}))
    args = ["--student", "resnet8", "--epochs", 1, "--device", "cpu", "--out", tmp_path / "run"]
    run_cli("distill", scored_store, "--config", path, *args)
    summary = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert set(summary["losses"]) == {"feature_mse", "feature_cosine"} and 0 < summary["final"]["feature_cosine"] < 2
    path.write_text(yaml.safe_dump({"distill": {"losses": {"feature_cosine": {"per": "pixel"}}}}))
    result = run_cli("distill", scored_store, "--config", path, *args, expect_ok=False)
    assert_one_line_error(result, str(path), "distill.losses", "per must be position or sample")


def test_methods_lists_every_description_whole():
    """Each method's, loss's and augmentation policy's description in full, wrapped within the width, never cut."""
    from pipeline.cli import MAX_WIDTH
    from pipeline.data.augment import POLICIES
    from pipeline.distillation.losses import LOSSES

    output = run_cli("methods").output
    assert max(map(len, output.splitlines())) <= MAX_WIDTH
    flowing = " ".join(output.split())
    descriptions = [METHODS.get(n).summary for n in METHODS.names()]
    descriptions += [LOSSES.summary(n) for n in LOSSES.names()] + [POLICIES.summary(n) for n in POLICIES.names()]
    for text in descriptions:
        assert " ".join(text.split()) in flowing
    assert "blind to feature scale, unlike the MSE. [per=position, eps=1e-08]" in flowing  # a docstring's 2nd line
    assert "crop-flip Pad by `padding` zeros" in flowing
