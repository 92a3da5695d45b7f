"""Default pairing: a distill with no layer options fits every student to a store of four picks (docs/method.md §2: k is
the number of student layers distilled, the teacher's top k by Q), and errors name options as the caller passes
them: keywords in Python, flags on the command line."""

from __future__ import annotations

import logging

import pytest

from helpers import run_cli
from pipeline import DistillConfig, ExtractConfig, ScoreConfig, distill, extract, list_models, score
from pipeline.distillation.quality import select_top_k
from pipeline.errors import UserError

# Students beyond the built-ins: a sample of the families timm and torchvision serve, small enough at 32 px.
EXTERNAL_STUDENTS = ["timm:resnet10t", "timm:mobilenetv3_small_050", "tv:mobilenet_v2", "tv:shufflenet_v2_x0_5"]


@pytest.fixture(scope="module")
def picked_store(digits_teacher, tmp_path_factory):
    """The demo's store in small: every tap of the digits teacher on 400 train images, scored with the default
    top-k (four picks, more than resnet8's three stages)."""
    out = tmp_path_factory.mktemp("picked_store")
    extract(ExtractConfig(out=str(out), checkpoint=digits_teacher["checkpoint"], max_samples=400, device="cpu"))
    score(ScoreConfig(store=str(out), plot=False))
    return out


def _distill(store, out, **options) -> dict:
    return distill(DistillConfig(store=str(store), out=str(out), steps=1, batch_size=16, device="cpu", **options))


@pytest.mark.slow  # 13 students, 15 s: the resnet8 test below keeps the rule in the fast path
@pytest.mark.parametrize("student", list_models() + EXTERNAL_STUDENTS)
def test_a_default_distill_fits_every_student(picked_store, tmp_path, student):
    summary = _distill(picked_store, tmp_path, student=student)
    assert 1 <= len(summary["student_taps"]) == len(summary["teacher_taps"]) <= 4
    assert summary["steps"] == 1


def test_a_student_with_fewer_layers_than_picks_takes_the_top_k_by_q(picked_store, tmp_path, caplog):
    scores = score(ScoreConfig(store=str(picked_store), plot=False))  # reused: the recorded Q of every tap
    assert len(scores["selected"]) == 4
    taps = scores["taps"]  # in depth order
    top3 = [taps[i]["name"] for i in select_top_k([t["Q"] for t in taps], 3)]
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        summary = _distill(picked_store, tmp_path, student="resnet8")
    assert summary["student_taps"] == ["layer1.0", "layer2.0", "layer3.0"]
    assert summary["teacher_taps"] == top3
    assert "3 pairable layers for 4 teacher taps" in caplog.text
    assert "teacher_layers=" in caplog.text and "--teacher-layers" not in caplog.text


def test_api_errors_name_keywords_and_cli_errors_name_flags(picked_store, tmp_path):
    wrong = {"student": "resnet9", "student_layers": ("layer1.0",), "teacher_layers": ("layer2.0", "layer3.0")}
    with pytest.raises(UserError, match="student_layers=") as raised:
        _distill(picked_store, tmp_path, **wrong)
    assert "--" not in str(raised.value)
    cli = run_cli(
        *("distill", str(picked_store), "--out", str(tmp_path / "cli"), "--steps", "1", "--device", "cpu"),
        *("--student-layers", "layer1.0", "--teacher-layers", "layer2.0,layer3.0"),
        expect_ok=False,
    )
    assert cli.exit_code == 1 and "--teacher-layers" in cli.output and "teacher_layers=" not in cli.output
