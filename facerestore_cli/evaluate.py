"""An honest comparison of restorers against simple baselines on a test set (data/testsets.py).

`evaluate` restores the LQ images of a pair folder (or of LQ folders alone) with each
restorer and with baselines, scores every method with the metric registry's metrics, and
returns the mean per method and metric, the metrics that could not run here (with reasons) and,
optionally, a PNG grid (rows: input | baseline | each restorer | ground truth).

Without ground truth (real degraded photos) full-reference metrics are skipped, but with
`input_reference` the identity metrics are scored against the degraded input itself, as
`identity@input` and `identity_dist@input`: does the output still show the person in the input?
The `input` baseline is that image, so it scores perfectly there by construction; PSNR/SSIM are
never scored against the input (they would only reward doing nothing).

Baselines: `input` is the degraded image itself; `bicubic_unsharp` is the classical answer,
bicubic resize to the output size (when the LQ is smaller) followed by an unsharp mask.
With pairs, `ground_truth` is also scored by the no-reference metrics, as the level to aim for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch

import facerestore_cli.rewards  # noqa: F401  (adds frm and lrpo_reward to the metric registry)
from facerestore_cli.data.testsets import (
    EvalInputError,
    EvalItem,
    as_folders,
    find_lq,
    find_pairs,
    resize_for_scoring,
    write_png,
)
from facerestore_cli.errors import FacerestoreError
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import read_image
from facerestore_cli.metrics import (
    Metric,
    MetricInfo,
    MetricUnavailable,
    available_metrics,
    create_metric,
    finite_mean,
    metric_info,
    unavailable_metrics,
)
from facerestore_cli.metrics.identity import IdentityDistance, IdentitySimilarity
from facerestore_cli.models.color import AUTO_COLOR_FIX, color_fix_for, parse_color_fix_choice
from facerestore_cli.models.inference import by_size, restore_crops

BASELINES = ("input", "bicubic_unsharp")


GROUND_TRUTH = "ground_truth"


GRID_TILE = 256


def _find_items(pairs: Path | str | None, lq: Path | str | Sequence[Path | str] | None, limit: int | None) -> tuple[list[EvalItem], str]:
    """The images to evaluate and a short description of where they come from."""
    lq_folders = as_folders(lq) if lq is not None else []
    if (pairs is None) == (not lq_folders):
        raise EvalInputError("give exactly one of a pair folder (--pairs) or LQ folders (--lq)")
    items = find_pairs(pairs) if pairs is not None else find_lq(lq_folders)
    if limit is not None:
        items = items[: max(1, int(limit))]
    return items, str(pairs) if pairs is not None else ", ".join(map(str, lq_folders))


def unsharp(rgb: np.ndarray, sigma: float = 2.0, amount: float = 0.6) -> np.ndarray:
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigma)
    return cv2.addWeighted(rgb, 1 + amount, blurred, -amount, 0)


def bicubic_unsharp(lq: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The classical baseline: bicubic to the output size, then an unsharp mask."""
    return unsharp(resize_for_scoring(lq, size, cv2.INTER_CUBIC))


def _check_baselines(baselines: Iterable[str]) -> list[str]:
    baselines = list(baselines)
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise EvalInputError(f"unknown baseline {bad[0]!r}; choose from {', '.join(BASELINES)}")
    return baselines


@dataclass
class EvalResult:
    methods: list[str]
    metrics: list[MetricInfo]
    #: method -> metric -> mean over the images it could be computed for (nan: none)
    table: dict[str, dict[str, float]]
    #: method -> metric -> how many images the mean is over
    counts: dict[str, dict[str, int]]
    #: metric -> one-line reason it could not run here (missing package or weights)
    unavailable: dict[str, str]
    #: metric -> why it was not computed for this data (e.g. full-reference without ground truth)
    skipped: dict[str, str]
    images: int
    #: method -> seconds per image of producing the output (restorers: model time only)
    seconds_per_image: dict[str, float]
    per_image: list[dict] = field(default_factory=list)
    grid: Path | None = None
    source: str = ""
    #: metric -> what it compares each output with: GROUND_TRUTH, INPUT (the degraded input) or None (no-reference)
    reference: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        metrics = {
            m.name: {"kind": m.kind, "lower_better": m.lower_better, "description": m.description, "reference": self.reference.get(m.name)}
            for m in self.metrics
        }
        return clean(
            {
                "source": self.source,
                "images": self.images,
                "methods": self.methods,
                "metrics": metrics,
                "table": self.table,
                "counts": self.counts,
                "seconds_per_image": self.seconds_per_image,
                "unavailable": self.unavailable,
                "skipped": self.skipped,
                "grid": str(self.grid) if self.grid else None,
                "per_image": self.per_image,
            }
        )


#: Full-reference metrics that still mean something against the degraded input itself: is the
#: output the same person? (PSNR/SSIM against the input would only reward doing nothing.)
IDENTITY_METRICS = (IdentitySimilarity.name, IdentityDistance.name)


INPUT = "input"


AT_INPUT = "@input"


NEEDS_GT = "full-reference: needs ground truth (--pairs)"


@dataclass(frozen=True)
class ScoredMetric:
    """One column of the table: a registry metric and what each output is compared with."""

    info: MetricInfo  # as reported (`identity@input` for a metric scored against the input)
    metric: str  # the registry metric that computes it
    reference: str | None  # GROUND_TRUTH, INPUT, or None for a no-reference metric


def _wanted_metrics(names: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """Registry names to run (None: every available one), and the unavailable ones with reasons."""
    if names is None:
        return available_metrics(), unavailable_metrics()
    wanted, unavailable = [], {}
    for n in names:
        info = metric_info(n)  # ValueError for unknown names
        if info.unavailable_reason:
            unavailable[info.name] = info.unavailable_reason
        elif info.name not in wanted:
            wanted.append(info.name)
    return wanted, unavailable


def _against_input(info: MetricInfo) -> MetricInfo:
    return MetricInfo(info.name + AT_INPUT, True, info.lower_better, f"{info.description}; against the degraded input, not ground truth")


def _select_metrics(
    names: Sequence[str] | None, have_gt: bool, input_reference: bool = False
) -> tuple[list[ScoredMetric], dict[str, str], dict[str, str]]:
    """The columns to score, the unavailable metrics and the skipped ones (each with its reason)."""
    wanted, unavailable = _wanted_metrics(names)
    chosen, skipped = [], {}
    for n in wanted:
        info = metric_info(n)
        if not info.full_reference:
            chosen.append(ScoredMetric(info, n, None))
        elif have_gt:
            chosen.append(ScoredMetric(info, n, GROUND_TRUTH))
        else:
            skipped[n] = (
                NEEDS_GT if not input_reference or n in IDENTITY_METRICS else NEEDS_GT + "; against the input it would reward doing nothing"
            )
        if input_reference and n in IDENTITY_METRICS:
            chosen.append(ScoredMetric(_against_input(info), n, INPUT))
    if input_reference:
        unavailable.update({n + AT_INPUT: r for n, r in list(unavailable.items()) if n in IDENTITY_METRICS})
        if not any(s.reference == INPUT for s in chosen) and not any(n in unavailable for n in IDENTITY_METRICS):
            raise EvalInputError(
                f"the input reference scores identity metrics ({', '.join(IDENTITY_METRICS)}); none of them is among the chosen metrics"
            )
    return chosen, unavailable, skipped


def _create_scorers(
    chosen: list[ScoredMetric], device: torch.device, unavailable: dict[str, str]
) -> tuple[dict[str, Metric], list[ScoredMetric]]:
    """One scorer per registry metric; columns whose metric fails to load move to `unavailable`."""
    scorers = {}
    for name in dict.fromkeys(s.metric for s in chosen):
        try:
            scorers[name] = create_metric(name, device)
        except MetricUnavailable as err:
            unavailable.update({s.info.name: str(err).split(": ", 1)[-1] for s in chosen if s.metric == name})
    return scorers, [s for s in chosen if s.metric in scorers]


def _model_labels(models: Sequence[Path]) -> list[str]:
    """Each model's table row: its folder's name, with as many parent folders as it takes to tell
    apart models of the same name (runs/a/final and runs/b/final: a/final, b/final); the whole
    path where that is not enough, or the name is a baseline's."""
    parts = [Path(m).parts or (str(m),) for m in models]
    depth = [1] * len(models)
    for _ in range(max((len(p) for p in parts), default=1)):
        labels = [Path(*p[-d:]).as_posix() for p, d in zip(parts, depth)]
        clash = {label for label in labels if labels.count(label) > 1}
        if not clash:
            break
        depth = [d + (label in clash) for d, label in zip(depth, labels)]
    return [str(m) if label in BASELINES or label == GROUND_TRUTH or labels.count(label) > 1 else label for m, label in zip(models, labels)]


def load_restorers(
    models: Sequence[Path | str | tuple[str, torch.nn.Module]], device: torch.device, dtype: torch.dtype
) -> list[tuple[str, torch.nn.Module]]:
    """(table label, restorer in eval mode) per model folder or already loaded (label, restorer)."""
    from facerestore_cli.models.loading import load_restorer

    restorers = []
    labels = iter(_model_labels([Path(m) for m in models if not isinstance(m, tuple)]))
    for item in models:
        if isinstance(item, tuple):
            restorers.append((str(item[0]), item[1].eval()))
            continue
        label = next(labels)
        try:
            restorers.append((label, load_restorer(Path(item), None, device, dtype)))
        except (FacerestoreError, OSError) as err:  # OSError: diffusers on a broken folder
            raise EvalInputError(f"{item}: cannot load restorer ({str(err).splitlines()[0]})") from None
    return restorers


def _restore(model, images: list[np.ndarray], color_fix: str) -> list[np.ndarray]:
    """Batched restoration of same-size uint8 crops, exactly as `restore` does it."""
    return restore_crops(model, images, len(images), color_fix)


def _restore_mixed_sizes(model, images: list[np.ndarray], color_fix: str) -> list[np.ndarray]:
    """Restore crops of several sizes: each same-size group as one batch, results in input order."""
    return by_size(images, lambda same: _restore(model, same, color_fix))


@dataclass
class _Batch:
    items: list[EvalItem]
    lqs: list[np.ndarray]  # as read
    targets: list[tuple[int, int]]  # (height, width) every output is made and scored at
    inputs: list[np.ndarray]  # the LQ at the target size: what restorers see, the `input` baseline
    refs: list[np.ndarray] | None  # the ground truth at the target size


def _read_batch(items: list[EvalItem], size: int | None) -> _Batch:
    """Read a batch; the target size is `size`, else the ground truth's, else the LQ image's own."""
    try:
        lqs = [read_image(it.lq).rgb for it in items]
        hqs = [read_image(it.hq).rgb for it in items] if items[0].hq is not None else None
    except MediaError as err:
        raise EvalInputError(str(err)) from None
    if size:
        targets = [(size, size)] * len(items)
    else:
        targets = [im.shape[:2] for im in (hqs if hqs is not None else lqs)]
    inputs = [resize_for_scoring(im, t, cv2.INTER_CUBIC) for im, t in zip(lqs, targets)]
    refs = [resize_for_scoring(im, t) for im, t in zip(hqs, targets)] if hqs is not None else None
    return _Batch(items, lqs, targets, inputs, refs)


def produce_outputs(
    batch: _Batch, baselines: list[str], restorers: list[tuple[str, torch.nn.Module]], color_fix: str, seconds: dict[str, float]
) -> dict[str, list[np.ndarray]]:
    """Each baseline's and restorer's outputs for a batch; adds the time each took to `seconds`."""
    outputs: dict[str, list[np.ndarray]] = {}
    for b in baselines:
        t0 = time.perf_counter()
        outputs[b] = batch.inputs if b == INPUT else [bicubic_unsharp(im, t) for im, t in zip(batch.lqs, batch.targets)]
        seconds[b] += time.perf_counter() - t0
    for label, model in restorers:
        t0 = time.perf_counter()
        outputs[label] = _restore_mixed_sizes(model, batch.inputs, color_fix_for(model, color_fix))
        seconds[label] += time.perf_counter() - t0
    return outputs


def score_outputs(
    outputs: dict[str, list[np.ndarray]], batch: _Batch, chosen: list[ScoredMetric], scorers: dict[str, Metric]
) -> dict[str, dict[str, list[float]]]:
    """method -> column -> one score per image of the batch (the ground truth: no-reference only)."""
    refs = {None: None, GROUND_TRUTH: batch.refs, INPUT: batch.inputs}
    return {
        method: {
            s.info.name: scorers[s.metric].score_batch(outs, refs[s.reference])
            for s in chosen
            if not (method == GROUND_TRUTH and s.reference)
        }
        for method, outs in outputs.items()
    }


def _per_image_records(batch: _Batch, batch_scores: dict[str, dict[str, list[float]]]) -> list[dict]:
    return [
        {"file": it.name, "method": method, **{k: float(v[j]) for k, v in per.items()}}
        for method, per in batch_scores.items()
        for j, it in enumerate(batch.items)
    ]


def _grid_rows(batch: _Batch, outputs: dict[str, list[np.ndarray]], cols: list[str], room: int) -> list[list[np.ndarray]]:
    """Up to `room` grid rows of this batch, one image per column (the ground truth from the refs)."""
    return [[outputs[m][j] if m in outputs else batch.refs[j] for m in cols] for j in range(min(room, len(batch.items)))]


def tabulate(scores: dict[str, dict[str, list[float]]]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """Mean and count of the finite scores per method and column."""
    table = {m: {k: finite_mean(v)[0] for k, v in per.items()} for m, per in scores.items()}
    counts = {m: {k: finite_mean(v)[1] for k, v in per.items()} for m, per in scores.items()}
    return table, counts


def _labelled_grid(rows: list[list[np.ndarray]], labels: list[str], tile: int = GRID_TILE) -> np.ndarray:
    header = np.full((28, tile * len(labels), 3), 255, np.uint8)
    for i, text in enumerate(labels):
        cv2.putText(header, text[:28], (i * tile + 6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    body = [np.concatenate([resize_for_scoring(im, (tile, tile)) for im in row], 1) for row in rows]
    return np.concatenate([header, *body], 0)


def _write_grid(grid: Path | str | None, rows: list[list[np.ndarray]], cols: list[str]) -> Path | None:
    if grid is None or not rows:
        return None
    write_png(Path(grid), _labelled_grid(rows, cols))
    return Path(grid)


def evaluate(
    pairs: Path | str | None = None,
    lq: Path | str | Sequence[Path | str] | None = None,
    models: Sequence[Path | str | tuple[str, torch.nn.Module]] = (),
    metrics: Sequence[str] | None = None,
    baselines: Iterable[str] = BASELINES,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    color_fix: str = AUTO_COLOR_FIX,
    size: int | None = None,
    grid: Path | str | None = None,
    grid_rows: int = 6,
    limit: int | None = None,
    per_image: bool = True,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    input_reference: bool = False,
) -> EvalResult:
    """Restore and score; see the module docstring.

    pairs: a pair folder (lq/ + hq/), or lq: one or several folders of LQ images only (searched
    recursively; no-reference metrics, plus identity against the input with input_reference).
    models: restorer folders (OneStepRestorer `save_pretrained` output, or what `restore --model`
    takes), or (label, loaded OneStepRestorer) pairs, e.g. to score a model while it trains.
    metrics: registry names (None: every available one). size: restore and score at size x size
    (default: the ground truth's size with pairs, each LQ image's own size without).
    input_reference: also score the identity metrics against the degraded input, as
    `identity@input` / `identity_dist@input` (the `input` baseline is perfect there by construction).
    """
    parse_color_fix_choice(color_fix)
    items, source = _find_items(pairs, lq, limit)
    have_gt = pairs is not None
    baselines = _check_baselines(baselines)
    chosen, unavailable, skipped = _select_metrics(metrics, have_gt, input_reference)
    if not chosen:
        raise EvalInputError("no metric can run: " + "; ".join(f"{k}: {v}" for k, v in {**unavailable, **skipped}.items()))
    device = torch.device(device)
    scorers, chosen = _create_scorers(chosen, device, unavailable)
    restorers = load_restorers(models, device, dtype)
    methods = baselines + [label for label, _ in restorers]
    if have_gt and any(s.reference is None for s in chosen):
        methods.append(GROUND_TRUTH)
    cols = [m for m in methods if m != GROUND_TRUTH] + ([GROUND_TRUTH] if have_gt else [])  # grid columns

    scores: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    seconds = {m: 0.0 for m in methods if m != GROUND_TRUTH}
    rows_for_grid: list[list[np.ndarray]] = []
    records: list[dict] = []
    if on_start:
        on_start(len(items))
    for start in range(0, len(items), batch_size):
        batch = _read_batch(items[start : start + batch_size], size)
        outputs = produce_outputs(batch, baselines, restorers, color_fix, seconds)
        if GROUND_TRUTH in methods:
            outputs[GROUND_TRUTH] = batch.refs
        batch_scores = score_outputs(outputs, batch, chosen, scorers)
        for method, per in batch_scores.items():
            for name, vals in per.items():
                scores[method].setdefault(name, []).extend(vals)
        if per_image:
            records += _per_image_records(batch, batch_scores)
        if grid is not None:
            rows_for_grid += _grid_rows(batch, outputs, cols, grid_rows - len(rows_for_grid))
        if on_batch:
            on_batch(len(batch.items))

    table, counts = tabulate(scores)
    return EvalResult(
        methods=methods,
        metrics=[s.info for s in chosen],
        table=table,
        counts=counts,
        unavailable=unavailable,
        skipped=skipped,
        images=len(items),
        seconds_per_image={m: s / max(1, len(items)) for m, s in seconds.items()},
        per_image=records,
        grid=_write_grid(grid, rows_for_grid, cols),
        source=source,
        reference={s.info.name: s.reference for s in chosen},
    )
