"""Which taps meet: the teacher taps a method distills from and the student taps paired with them in depth order."""

from __future__ import annotations

import math

import torch
from torch import nn

from cache.store import FeatureStore, SplitStore

from .errors import UserError
from .methods import Method
from .models import create_model
from .quality import select_top_k
from .taps import Tap, list_taps, stage_end_taps


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
    picks (`feature`) or the teacher's stage ends (`feature-standard`, `fitnet`). A method without a feature
    loss pairs nothing and ignores both options (one config can then serve every method of a comparison).
    """
    if not method.has_feature_loss:
        return [], []
    k = len(teacher_layers) or len(student_layers) or None
    if teacher_layers:
        teacher = recorded_taps(store, teacher_layers)
    elif method.teacher_taps == "picked":
        teacher = picked_taps(store, part, k)
    else:
        teacher = standard_taps(store, k)
    return student_taps(net, input_size, student_layers, len(teacher)), teacher


def recorded_taps(store: FeatureStore, names: list[str] | tuple[str, ...], why: str = "") -> list[Tap]:
    """The cached teacher taps `names`, in depth order."""
    recorded = {t["name"]: Tap(t["index"], t["name"], tuple(t["shape"])) for t in store.meta["identity"]["taps"]}
    unknown = [n for n in names if n not in recorded]
    if unknown:
        raise UserError(f"teacher tap {unknown[0]!r}{why} is not in {store.path}; it holds {', '.join(recorded)}")
    return sorted((recorded[n] for n in names), key=lambda t: t.index)


def picked_taps(store: FeatureStore, part: SplitStore, k: int | None) -> list[Tap]:
    """The store's picks from `kdpipe score`, or the top k by its recorded Q when k differs from its top-k."""
    scores = part.group.attrs.get("scores")
    if not scores:
        raise UserError(f"{store.path} has no scores; run `kdpipe score` first or pass --teacher-layers")
    if k is None or k == len(scores["selected"]):
        return recorded_taps(store, scores["selected"])
    scored = recorded_taps(store, list(scores["Q"]))
    qualities = [math.nan if scores["Q"][t.name] is None else float(scores["Q"][t.name]) for t in scored]
    return [scored[i] for i in select_top_k(qualities, k)]


def standard_taps(store: FeatureStore, k: int | None) -> list[Tap]:
    """The teacher's stage ends (its `feature_info`), spread to k when k is given; they must be cached."""
    teacher = store.meta["identity"]["teacher"]
    input_size = store.meta["identity"]["dataset"]["preprocessing"]["input_size"]
    kwargs = teacher.get("model_kwargs") or {}
    try:
        with torch.random.fork_rng():  # building the architecture must not move the student's random stream
            model = create_model(
                teacher["name"],
                store.meta["identity"]["dataset"]["num_classes"],
                input_size=input_size,
                model_kwargs=kwargs,
            )
    except UserError as err:
        raise UserError(
            f"cannot rebuild teacher {teacher['name']!r} of {store.path} (model kwargs {kwargs}): {err}"
        ) from err
    taps = list_taps(model, input_size)
    ends = pairable(taps, stage_end_taps(taps, model))
    if not ends:
        raise UserError(f"teacher {teacher['name']} declares no stages (feature_info); pass --teacher-layers")
    k = k or len(ends)
    if k > len(ends):
        raise UserError(
            f"teacher {teacher['name']} has {len(ends)} stage ends for {k} pairs; "
            "pass --teacher-layers or fewer --student-layers"
        )
    return recorded_taps(store, [t.name for t in spread(ends, k)], " (a stage end of the teacher)")


def pairable(taps: list[Tap], names: list[str] | None = None) -> list[Tap]:
    """Taps that may be paired (of `names`, if given): never the first (stem or patch embedding), never a vector."""
    return [t for t in taps[1:] if t.kind != "vector" and (names is None or t.name in names)]


def spread(candidates: list[Tap], k: int) -> list[Tap]:
    """k of the candidates spread evenly over depth, ending at the last."""
    return [candidates[round((i + 1) * len(candidates) / k) - 1] for i in range(k)]


def spread_taps(taps: list[Tap], stage_ends: list[str], k: int) -> list[Tap]:
    """The default student taps: k stage ends spread over depth, or k blocks when there are fewer stages."""
    ends, blocks = pairable(taps, stage_ends), pairable(taps)
    candidates = ends if len(ends) >= k else blocks
    if len(candidates) < k:
        raise UserError(f"the student has only {len(candidates)} taps for {k} pairs; pass --student-layers")
    return spread(candidates, k)


def student_taps(net: nn.Module, input_size: int, requested: tuple[str, ...], k: int) -> list[Tap]:
    """The requested student taps (as many as the teacher's), or the default spread of k."""
    if requested:
        taps = list_taps(net, input_size, names=list(requested))
        if len(taps) != k:
            raise UserError(f"{len(taps)} student taps for {k} teacher taps; they pair one-to-one in depth order")
        return taps
    taps = list_taps(net, input_size)
    return spread_taps(taps, stage_end_taps(taps, net), k)
