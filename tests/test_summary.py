"""`kdpipe summary`: every distilled student with the accuracy that evaluates it (its probe, or the classifier its
method trained)."""

from __future__ import annotations

import json

from pipeline.stages.summary import summarize


def _write(path, **values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


def test_each_student_is_listed_with_what_evaluates_it(tmp_path):
    _write(tmp_path / "a-feature/distill.json", method="feature", student="resnet8")
    _write(tmp_path / "a-feature/probe.json", test_split="test", test_top1=99.17, tap="layer3.0")
    _write(tmp_path / "b-kd/distill.json", method="kd", student="resnet8", test_split="test", test_top1=99.72)
    _write(tmp_path / "c-fitnet/distill.json", method="fitnet", student="resnet9", test_split="val", test_top1=98.5)
    _write(tmp_path / "c-fitnet/probe.json", test_split="val", test_top1=97.25, tap="layer4.0")
    _write(tmp_path / "d-unprobed/distill.json", method="feature", student="resnet8")
    assert summarize(tmp_path).splitlines() == [
        "student  resnet8          test top-1  99.17%  (feature-only distillation + linear probe on layer3.0)",
        "student  resnet8          test top-1  99.72%  (kd, its own classifier)",
        "student  resnet9          val top-1  97.25%  (fitnet, linear probe on layer4.0)",
    ]
