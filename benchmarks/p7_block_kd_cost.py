"""P7: what one Block-KD step costs against a vanilla-KD step on the same recipe and batches.

Block-KD is the only method that runs teacher computation every step: each stepping stone runs the frozen teacher's
tail from stage i, forward and backward (to reach the connector and the student). Measured in one run, on the same
in-memory batches with AdamW + OneCycle, alternating: a `kd` step (student forward, CE + KD on cached logits,
backward) and a `block-kd` step (the same plus the stones). For scale, the same stones run from the image (the whole
teacher forward and backward once per stone, what the stones would cost without cutting the teacher's graph).

    python benchmarks/p7_block_kd_cost.py [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from workload import STUDENT, TEACHER, TEACHER_TAPS, Timer, setup_threads

BATCH = 128
STUDENT_STAGES = ("layer1.0", "layer2.0", "layer3.0")  # resnet8's three stages, joined to TEACHER_TAPS


def distillers():
    """(kd, block-kd) distillers on fresh, identically seeded resnet8 students, and the teacher."""
    from pipeline.distillation.losses import FrozenTeacher, TermSetup
    from pipeline.distillation.methods import Distiller, get_method
    from pipeline.models.taps import list_taps
    from pipeline.models.zoo import create_model

    torch.manual_seed(0)
    teacher = create_model(TEACHER, 10)
    built = []
    for method in ("kd", "block-kd"):
        torch.manual_seed(0)
        student = create_model(STUDENT, 10)
        setup = TermSetup()
        if method == "block-kd":
            stages = [list_taps(m, 32, names=list(n)) for m, n in ((student, STUDENT_STAGES), (teacher, TEACHER_TAPS))]
            setup = TermSetup(teacher=FrozenTeacher(TEACHER, teacher, *stages, 32))
        built.append(Distiller(student, get_method(method), setup))
    return (*built, teacher)


def step_seconds(distiller, optimizer, schedule, images, batch) -> float:
    with Timer() as timer:
        loss = sum(distiller(images, batch)[1].values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return timer.seconds


def teacher_from_the_image_seconds(teacher, images: torch.Tensor, stones: int) -> float:
    """The whole teacher forward and backward (to its input), once per stone: the cost without the cut."""
    with Timer() as timer:
        for _ in range(stones):
            x = images.clone().requires_grad_(True)
            teacher(x).sum().backward()
    return timer.seconds


def main() -> None:
    from pipeline.engine.recipe import adamw_onecycle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    setup_threads()
    kd, block_kd, teacher = distillers()
    runs = {}
    for name, distiller in (("kd", kd), ("block-kd", block_kd)):
        distiller.train()
        runs[name] = (distiller, *adamw_onecycle(distiller.parameters(), 0.05, 0.01, args.steps + 1), [])
    g = torch.Generator().manual_seed(0)
    full = []
    for i in range(args.steps + 1):  # the first step of each is an untimed warm-up
        images = torch.randn(BATCH, 3, 32, 32, generator=g)
        batch = {"labels": torch.randint(0, 10, (BATCH,), generator=g), "logits": torch.randn(BATCH, 10, generator=g)}
        for distiller, optimizer, schedule, times in runs.values():  # alternating, so both see the same machine
            seconds = step_seconds(distiller, optimizer, schedule, images, batch)
            times.extend([seconds] if i else [])
        seconds = teacher_from_the_image_seconds(teacher, images, len(STUDENT_STAGES))
        full.extend([seconds] if i else [])
    kd_step, block_step = (statistics.median(runs[m][3]) for m in ("kd", "block-kd"))
    from_image = statistics.median(full)
    stones = block_step - kd_step
    print(f"{TEACHER} -> {STUDENT}, stones at {', '.join(TEACHER_TAPS)}, batch {BATCH}, {args.steps} steps each")
    print(f"kd step {kd_step * 1000:.0f} ms, block-kd step {block_step * 1000:.0f} ms (stones {stones * 1000:.0f} ms)")
    print(
        f"the same {len(STUDENT_STAGES)} stones run from the image: {from_image * 1000:.0f} ms of teacher forward + "
        f"backward ({from_image / stones:.2f}x what the cut tails take)"
    )
    print(f"P7 block-kd / kd seconds per step: {block_step / kd_step:.2f}")


if __name__ == "__main__":
    main()
