"""Cross-family distillation on digits: teacher -> student pairs across layouts (NCHW maps, NHWC maps, ViT tokens),
each run end to end with the default method: teach, extract, score, distill (feature-only), probe.

    python scripts/cross_family.py [--teacher-epochs 8] [--distill-epochs 10] [--out EMPTY_FOLDER]

Prints one markdown row per pair: the teacher's test top-1, the student's probe top-1 and the seconds of every
stage (docs/models.md holds the table of a run). Random-init models at 32 px, nothing downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline import (
    DistillConfig,
    ExtractConfig,
    ProbeConfig,
    ScoreConfig,
    TeachConfig,
    distill,
    extract,
    probe,
    score,
    teach,
)

SWIN = {"patch_size": 2, "window_size": 4, "embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4]}
VIT = {"patch_size": 4}
MODELS = {  # name -> (model, kwargs)
    "resnet20": ("resnet20", {}),
    "vit_tiny_cifar": ("vit_tiny_cifar", {}),
    "swin": ("timm:swin_tiny_patch4_window7_224", SWIN),
    "timm-vit": ("timm:test_vit", VIT),
    "convnext": ("timm:test_convnext", {}),
    "tv-resnet18": ("tv:resnet18", {}),
    "tv-mobilenet_v2": ("tv:mobilenet_v2", {"width_mult": 0.5}),
    "deit": ("timm:deit_tiny_distilled_patch16_224", {"patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3}),
}
PAIRS = [  # (teacher, student, what it shows)
    ("resnet20", "timm-vit", "CNN -> ViT"),
    ("vit_tiny_cifar", "resnet20", "ViT -> CNN"),
    ("resnet20", "swin", "CNN -> NHWC"),
    ("swin", "timm-vit", "NHWC -> ViT"),
    ("tv-resnet18", "convnext", "torchvision -> timm"),
    ("vit_tiny_cifar", "deit", "ViT -> DeiT (1 vs 2 prefix tokens)"),
    ("convnext", "tv-mobilenet_v2", "timm -> torchvision"),
]


def timed(fn, config) -> tuple[dict, float]:
    start = time.perf_counter()
    result = fn(config)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--distill-epochs", type=int, default=10)
    parser.add_argument("--out", help="an empty or new folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kdpipe-cross-family-"))
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty")
    teachers: dict[str, tuple[dict, float]] = {}
    print(
        "| teacher -> student | shows | teacher top-1 | probe top-1 | pairs | s teach | s extract | s score | "
        "s distill | s probe |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for teacher, student, shows in PAIRS:
        t_name, t_kwargs = MODELS[teacher]
        s_name, s_kwargs = MODELS[student]
        shared = teacher in teachers  # its teacher, store and scores come from an earlier row
        if not shared:
            config = TeachConfig(
                out=str(out / teacher),
                teacher=t_name,
                model_kwargs=t_kwargs,
                epochs=args.teacher_epochs,
                overwrite=True,
                device="cpu",
            )
            teachers[teacher] = timed(teach, config)
        (taught, t_teach) = teachers[teacher]
        store = out / f"{teacher}-store"
        if not shared:
            _, t_extract = timed(
                extract,
                ExtractConfig(
                    out=str(store),
                    teacher=t_name,
                    model_kwargs=t_kwargs,
                    checkpoint=taught["checkpoint"],
                    overwrite=True,
                    device="cpu",
                ),
            )
            _, t_score = timed(score, ScoreConfig(store=str(store), plot=False))
        run = out / f"{teacher}-to-{student}"
        distilled, t_distill = timed(
            distill,
            DistillConfig(
                store=str(store),
                out=str(run),
                student=s_name,
                model_kwargs=s_kwargs,
                epochs=args.distill_epochs,
                device="cpu",
            ),
        )
        probed, t_probe = timed(probe, ProbeConfig(run=str(run), device="cpu"))
        pairs = ", ".join(f"{p['teacher']}->{p['student']}" for p in distilled["pairs"])
        teacher_seconds = (
            "(above) | (above) | (above)" if shared else f"{t_teach:.0f} | {t_extract:.0f} | {t_score:.0f}"
        )
        print(
            f"| {t_name} -> {s_name} | {shows} | {taught['test_top1']:.1f} | {probed['test_top1']:.1f} | {pairs} | "
            f"{teacher_seconds} | {t_distill:.0f} | {t_probe:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
