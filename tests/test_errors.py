"""How a user error names options: as keywords for a Python caller, as flags on the command line."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError, flag_style, flags, keywords


@pytest.mark.parametrize(
    ("written", "as_keywords", "as_flags"),
    [
        ("pass --student-layers", "pass student_layers=", "pass --student-layers"),
        ("rerun with --overwrite, or --no-online-teacher", "rerun with overwrite=True, or online_teacher=False", None),
        (
            "--views=3: views 1..2 need --augment=POLICY.",
            "views=3: views 1..2 need augment=POLICY.",
            "--views 3: views 1..2 need --augment POLICY.",
        ),
        ("--method=block-kd reads logits", "method='block-kd' reads logits", "--method block-kd reads logits"),
        ("--label-fraction=0.01: too few", "label_fraction=0.01: too few", "--label-fraction 0.01: too few"),
        ("--methods: no entry", "methods: no entry", None),
        ("run `kdpipe extract --overwrite` (kdpipe score --top-k 3)", None, None),  # quoted command lines stay
        ("--config FILE, torchrun --nproc-per-node N", None, None),  # not options of the API
    ],
)
def test_options_are_named_as_the_caller_passes_them(written, as_keywords, as_flags):
    assert keywords(written) == (as_keywords or written)
    assert flags(written) == (as_flags or written)


def test_a_user_error_takes_the_style_it_was_raised_under():
    assert str(UserError("pass --teacher-layers")) == "pass teacher_layers="
    with flag_style():
        assert str(UserError("pass --teacher-layers")) == "pass --teacher-layers"
    assert str(UserError("pass --teacher-layers")) == "pass teacher_layers="
