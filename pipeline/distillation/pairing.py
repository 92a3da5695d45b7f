"""Which taps meet: the teacher taps a method distills from and the student taps paired with them in depth order."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from cache.store import FeatureStore, SplitStore

from ..config import ScoreConfig
from ..errors import UserError, styled
from ..models.taps import Tap, list_taps, stage_ends
from ..models.zoo import create_model
from .methods import Method
from .picks import store_picks
from .quality import select_top_k

log = logging.getLogger(__name__)
DEFAULT_PAIRS = ScoreConfig.top_k  # pairs when nothing says how many: as many as score picks
FAR_APART = 4


def pair_taps(
    method: Method,
    store: FeatureStore,
    part: SplitStore,
    net: nn.Module,
    input_size: int,
    teacher_layers: tuple[str, ...],
    student_layers: tuple[str, ...],
) -> tuple[list[Tap], list[Tap]]:
    """(student taps, teacher taps) paired in depth order, as the method asks.

    The number of pairs k comes from `--teacher-layers`, else `--student-layers`, else the method: the store's
    picks (`feature`) or the teacher's deepest stage ends (`feature-standard`, `fitnet`; as many as `kdpipe score`
    picks by default, fewer when the teacher has fewer stages). By default k is capped at the student's pairable
    layers (docs/method.md §2: k is the number of student layers distilled): a student with fewer layers than the
    store's picks takes the top k by Q. A method without a feature loss pairs nothing and ignores both options (one
    config can then serve every method of a comparison).
    """
    if not method.has_feature_loss:
        return [], []
    k = len(teacher_layers) or len(student_layers) or None
    offered = None if k else list_taps(net, input_size)  # the student's taps, for a default pairing only
    if teacher_layers:
        teacher = recorded_taps(store, teacher_layers)
    elif method.teacher_taps == "picked":
        teacher = picked_taps(store, part, k or _fitted(len(_picks(store, part).selected), offered, "top {} by Q"))
    else:
        teacher = standard_taps(store, k or _fitted(_standard_pairs(store), offered, "{} deepest stage ends"))
    student = student_taps(net, input_size, student_layers, len(teacher), offered)
    for s, t in zip(student, teacher, strict=True):
        _warn_if_far_apart(s, t)
    return student, teacher


def _fitted(pairs: int, student: list[Tap], teacher_side: str) -> int:
    """The default number of pairs: the teacher side's (`teacher_side`, formatted with the number), or the
    student's pairable layers where it has fewer."""
    layers = sum(t.pairable for t in student)
    if layers >= pairs:
        return pairs
    if not layers:
        raise UserError("the student has no pairable taps (`kdpipe layers STUDENT` lists them); pass --student-layers")
    log.warning(
        styled(
            "the student has %d pairable layers for %d teacher taps: pairing them with the teacher's %s "
            "(--teacher-layers and --student-layers choose others)"
        ),
        *(layers, pairs, teacher_side.format(layers)),
    )
    return layers


def recorded_taps(store: FeatureStore, names: list[str] | tuple[str, ...], why: str = "") -> list[Tap]:
    """The cached teacher taps `names`, in depth order."""
    recorded = {t.name: t for t in store_taps(store)}
    unknown = [n for n in names if n not in recorded]
    if unknown:
        raise UserError(f"teacher tap {unknown[0]!r}{why} is not in {store.path}; it holds {', '.join(recorded)}")
    return sorted((recorded[n] for n in names), key=lambda t: t.index)


def store_taps(store: FeatureStore) -> list[Tap]:
    """The store's taps with the shapes, layouts and roles extract recorded."""
    return [Tap.from_record(t) for t in store.identity.taps]


def picked_taps(store: FeatureStore, part: SplitStore, k: int) -> list[Tap]:
    """The store's k picks from `kdpipe score` (its own, or those of the sample store that chose what it caches), or
    the top k of its cached taps by the recorded Q when k differs from the picks' number."""
    scores = _picks(store, part)
    if k == len(scores.selected):
        return recorded_taps(store, scores.selected)
    cached = {t.name for t in store_taps(store)}
    scored = recorded_taps(store, [name for name in scores.quality if name in cached])
    if k > len(scored):
        raise UserError(f"{store.path} caches {len(scored)} scored taps for {k} pairs; pass --teacher-layers")
    qualities = [math.nan if scores.quality[t.name] is None else float(scores.quality[t.name]) for t in scored]
    return [scored[i] for i in select_top_k(qualities, k)]


def _picks(store: FeatureStore, part: SplitStore) -> dict:
    """The scores that chose the store's picks."""
    scores = store_picks(store, part.record.scores)
    if not scores:
        raise UserError(f"{store.path} has no scores; run `kdpipe score` first or pass --teacher-layers")
    return scores


def standard_taps(store: FeatureStore, k: int) -> list[Tap]:
    """The teacher's k deepest stage ends, which extract recorded from the teacher; they must be cached."""
    teacher, ends = store.identity.teacher, teacher_stage_ends(store)
    if k > len(ends):
        raise UserError(
            f"teacher {teacher.name} has {len(ends)} stage ends for {k} pairs; "
            "pass --teacher-layers or fewer --student-layers"
        )
    return recorded_taps(store, ends[-k:], " (a stage end of the teacher)")


def _standard_pairs(store: FeatureStore) -> int:
    """As many stage ends as score picks, fewer for a teacher with fewer stages."""
    return min(DEFAULT_PAIRS, len(teacher_stage_ends(store)))


def teacher_stage_ends(store: FeatureStore) -> list[str]:
    """The names of the teacher's stage ends, as extract recorded them (or read off its architecture)."""
    teacher = store.identity.teacher
    ends = teacher.stage_ends if teacher.stage_ends is not None else _rebuilt_stage_ends(store)
    if not ends:
        raise UserError(f"teacher {teacher.name} has no stage ends (no stages found); pass --teacher-layers")
    return ends


def stage_taps(
    store: FeatureStore,
    teacher: nn.Module,
    student: nn.Module,
    student_name: str,
    input_size: int,
    teacher_layers: tuple[str, ...],
    student_layers: tuple[str, ...],
) -> tuple[list[Tap], list[Tap]]:
    """(student stages, teacher stages) for Block-KD's stepping stones: the stage ends of both models (or the named
    taps), paired one to one in depth order; the live teacher gives the shapes, as it may cache none of them."""
    teacher_names = list(teacher_layers) or teacher_stage_ends(store)
    teacher_stages = list_taps(teacher, input_size, names=teacher_names)
    if student_layers:
        student_stages = list_taps(student, input_size, names=list(student_layers))
    else:
        student_stages = stage_ends(list_taps(student, input_size))
    if len(student_stages) != len(teacher_stages):
        named = store.identity.teacher.name
        raise UserError(
            f"teacher {named} has {len(teacher_stages)} stages ({', '.join(t.name for t in teacher_stages)}) and "
            f"student {student_name} {len(student_stages)} ({', '.join(t.name for t in student_stages) or 'none'}); "
            "name as many stage taps on both sides with --teacher-layers and --student-layers"
        )
    return student_stages, teacher_stages


def _rebuilt_stage_ends(store: FeatureStore) -> list[str]:
    """A store from before extract recorded the teacher's stage ends: they are read off its architecture, rebuilt
    with the recorded kwargs (no weights needed)."""
    identity = store.identity
    teacher, input_size = identity.teacher, identity.dataset.input_size
    kwargs = teacher.model_kwargs or None
    try:
        with torch.random.fork_rng():  # building the architecture must not move the student's random stream
            model = create_model(teacher.name, identity.dataset.num_classes, input_size=input_size, model_kwargs=kwargs)
    except UserError as err:
        raise UserError(f"cannot rebuild teacher {teacher.name!r} of {store.path} (kwargs {kwargs}): {err}") from err
    return [t.name for t in stage_ends(list_taps(model, input_size))]


def default_student_taps(taps: list[Tap], k: int) -> list[Tap]:
    """The student's k deepest stage ends (docs/method.md §2: ResNet-9 1-4, MobileNetV2 3,6,13,17, VGG-11 1,3,5,7,
    ViT-ET 1,3,5,7), or k layers spread evenly over depth, ending at the last, when it has fewer stages than pairs."""
    ends = stage_ends(taps)
    if len(ends) >= k:
        return ends[-k:]
    layers = [t for t in taps if t.pairable]
    if len(layers) < k:
        raise UserError(f"the student has only {len(layers)} pairable taps for {k} pairs; pass --student-layers")
    return [layers[round((i + 1) * len(layers) / k) - 1] for i in range(k)]


def student_taps(
    net: nn.Module, input_size: int, requested: tuple[str, ...], k: int, offered: list[Tap] | None = None
) -> list[Tap]:
    """The requested student taps (as many as the teacher's), or the default ones for k pairs among those the
    student offers."""
    if requested:
        taps = list_taps(net, input_size, names=list(requested))
        if len(taps) != k:
            raise UserError(
                f"--student-layers names {len(taps)} taps for {k} teacher taps; they pair one-to-one in depth order "
                "(name as many with --teacher-layers, or leave it out)"
            )
        return taps
    return default_student_taps(offered or list_taps(net, input_size), k)


def _warn_if_far_apart(student: Tap, teacher: Tap) -> None:
    """Pooling across more than FAR_APART x in an axis averages away most of the larger map: worth a warning."""
    if not (student.spatial and teacher.spatial):
        return
    ratios = [max(s, t) / min(s, t) for s, t in zip(student.spatial, teacher.spatial, strict=True)]
    if max(ratios) > FAR_APART:
        log.warning(
            "student tap %s %s and teacher tap %s %s differ %.0fx in spatial size; the larger is average-pooled",
            *(student.name, student.spatial, teacher.name, teacher.spatial, max(ratios)),
        )
