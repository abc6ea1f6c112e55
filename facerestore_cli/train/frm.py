"""Training the Face Reward Model on preference pairs (Bradley-Terry), with checkpoints and resume.

    loss = -[t log sigmoid(z) + (1 - t) log sigmoid(-z)],  z = exp(logit_scale) (score_a - score_b)

for a pair with target t (1: a preferred, 0: b preferred, 0.5: tie) and a per-pair weight (the
SVM's confidence, or a per-source weight). For two images this is the cross-entropy HPSv2 and
DiffusionReward train their reward models with. A fixed share of the pairs' groups (faces) is held
out and scored every `val_every` steps: pairwise accuracy on them is the number to watch.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from facerestore_cli.configfile import RunConfig
from facerestore_cli.data.annotations import (
    Pair,
    load_pair_files,
    split_pairs,
)
from facerestore_cli.errors import InputError
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import read_image
from facerestore_cli.rewards.frm import (
    FaceRewardModel,
    FrmConfig,
    load_frm,
    resize_for_model,
)
from facerestore_cli.train.checkpoint import JsonlLog
from facerestore_cli.train.runner import RunResult, TrainingMethod, run_training, update


@dataclass
class FrmTrainConfig(RunConfig):
    """Everything a run depends on; saved beside its checkpoints so it can be repeated. Relative
    `pairs`/`init` paths are kept as written (run from the repo). `[model]` is the FRM's own
    config (rewards.frm.FrmConfig), checked by `validate`."""

    KIND = "train-frm config"

    pairs: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    #: start from an FRM folder or an upstream open_clip checkpoint (HPSv2, FaceRewardModel.pth).
    init: str = ""
    #: open_clip architecture of an upstream `init` checkpoint.
    clip: str | dict[str, Any] = "ViT-H-14"
    #: open_clip only: keep this many last image groups / text layers trainable (paper: 20 / 11).
    unlocked_image_groups: int | None = None
    unlocked_text_layers: int | None = None
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    flip: bool = True
    val_fraction: float = 0.05
    val_every: int = 200
    log_every: int = 10
    checkpoint_every: int = 100
    save_dtype: str = "fp32"
    source_weights: dict[str, float] = field(default_factory=lambda: {"human": 1.0, "auto": 1.0, "svm": 1.0})
    #: how often pairs of a kind are drawn, relative to 1 (e.g. more of the rare `gt>restored`).
    kind_sampling: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if any(not w > 0 for w in self.kind_sampling.values()):
            raise InputError("kind_sampling weights must be positive")
        if self.save_dtype not in ("fp32", "fp16"):
            raise InputError(f"save_dtype must be fp32 or fp16, not {self.save_dtype!r}")
        FrmConfig.from_dict(self.model)  # fail early on a bad [model] table


# ------------------------------------------------------------------ data


def load_face(path: Path, size: int) -> torch.Tensor:
    """3xSxS float in [0, 1] with the FRM's own resize; MediaError for unreadable files."""
    rgb = read_image(path).rgb
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255
    return resize_for_model(x, size)[0]


class PairDataset(Dataset):
    """(image a, image b, target, weight, caption); an unreadable pair comes back as None."""

    def __init__(self, pairs: Sequence[Pair], size: int, flip: bool, source_weights: dict[str, float] | None = None) -> None:
        self.pairs = list(pairs)
        self.size = size
        self.flip = flip
        self.source_weights = source_weights or {}
        self.bad_files: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, path: Path) -> torch.Tensor:
        x = load_face(path, self.size)
        return x.flip(-1) if self.flip and random.random() < 0.5 else x

    def __getitem__(self, idx: int):
        p = self.pairs[idx]
        try:
            a, b = self._image(p.image_a), self._image(p.image_b)
        except MediaError as err:
            self.bad_files[str(err.path)] = err.reason
            return None
        weight = p.weight * self.source_weights.get(p.source, 1.0)
        return a, b, torch.tensor(p.target), torch.tensor(weight), p.caption


def collate_pairs(items: list) -> tuple | None:
    items = [i for i in items if i is not None]
    if not items:
        return None
    a, b, t, w, caps = zip(*items)
    return torch.stack(a), torch.stack(b), torch.stack(t), torch.stack(w), list(caps)


# ------------------------------------------------------------------ loss and evaluation
def bt_loss(
    model: FaceRewardModel, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, captions: list[str] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Bradley-Terry loss of a batch and the per-pair logits (both images in one pass)."""
    caps = None if captions is None else list(captions) * 2
    scores = model(torch.cat([a, b]), caps)
    sa, sb = scores.chunk(2)
    logits = model.preference_logits(sa, sb)
    per_pair = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_pair * weight).sum() / weight.sum().clamp(min=1e-8), logits.detach()


def pair_accuracy(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) over pairs that are not ties."""
    decided = target != 0.5
    correct = ((logits > 0) == (target > 0.5)) & decided
    return int(correct.sum()), int(decided.sum())


@dataclass
class PairEval:
    """Held-out pairwise accuracy, overall and by kind, and how often a face is ranked fully right."""

    pairs: int = 0
    accuracy: float = float("nan")
    loss: float = float("nan")
    by_kind: dict[str, tuple[float, int]] = field(default_factory=dict)
    ranking_faces: int = 0
    ranking_correct: float = float("nan")
    mean_scores: dict[str, float] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ROLES = {
    "gt>restored": ("ground truth", "restored"),
    "restored>degraded": ("restored", "degraded (full strength)"),
    "gt>degraded": ("ground truth", None),
}


@torch.no_grad()
def score_files(
    model: FaceRewardModel, paths: Sequence[Path], batch_size: int = 32, captions: Sequence[str] | None = None
) -> tuple[dict[Path, float], dict[str, str]]:
    """Scores of image files (each read once), and the unreadable ones with their reason."""
    was_training = model.training
    model.eval()
    scores: dict[Path, float] = {}
    bad: dict[str, str] = {}
    todo = list(dict.fromkeys(paths))
    caps = dict(zip(paths, captions)) if captions is not None else {}
    for i in range(0, len(todo), batch_size):
        chunk, xs = [], []
        for p in todo[i : i + batch_size]:
            try:
                xs.append(load_face(p, model.config.image_size))
                chunk.append(p)
            except MediaError as err:
                bad[str(p)] = err.reason
        if xs:
            out = model(torch.stack(xs).to(model.device), [caps.get(p, "") for p in chunk] if caps else None)
            scores.update(zip(chunk, out.float().cpu().tolist()))
    model.train(was_training)
    return scores, bad


def evaluate_pairs(model: FaceRewardModel, pairs: Sequence[Pair], batch_size: int = 32) -> PairEval:
    """Score every image once, then compare the pairs (captioned pairs are scored per pair)."""
    labelled = [p for p in pairs if p.preferred is not None]
    result = PairEval(pairs=len(labelled))
    if not labelled:
        return result
    if model.uses_captions and any(p.caption for p in labelled):
        return _evaluate_captioned(model, labelled, batch_size)
    scores, result.unreadable = score_files(model, [x for p in labelled for x in (p.image_a, p.image_b)], batch_size)
    usable = [p for p in labelled if p.image_a in scores and p.image_b in scores]
    diffs = torch.tensor([scores[p.image_a] - scores[p.image_b] for p in usable])
    targets = torch.tensor([p.target for p in usable])
    _fill(result, model, usable, diffs, targets)
    _ranking(result, usable, scores)
    return result


def _evaluate_captioned(model: FaceRewardModel, pairs: list[Pair], batch_size: int) -> PairEval:
    result = PairEval(pairs=len(pairs))
    diffs, usable = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            try:
                a = torch.stack([load_face(p.image_a, model.config.image_size) for p in chunk])
                b = torch.stack([load_face(p.image_b, model.config.image_size) for p in chunk])
            except MediaError as err:
                result.unreadable[str(err.path)] = err.reason
                continue
            caps = [p.caption for p in chunk]
            s = model(torch.cat([a, b]).to(model.device), caps + caps).float().cpu()
            diffs += (s[: len(chunk)] - s[len(chunk) :]).tolist()
            usable += chunk
    model.train(was_training)
    _fill(result, model, usable, torch.tensor(diffs), torch.tensor([p.target for p in usable]))
    return result


def _fill(result: PairEval, model: FaceRewardModel, usable: list[Pair], diffs: torch.Tensor, targets: torch.Tensor) -> None:
    if not usable:
        return
    logits = model.backbone.logit_scale.detach().float().exp().clamp(max=100.0).cpu() * diffs
    result.loss = float(F.binary_cross_entropy_with_logits(logits, targets))
    correct, counted = pair_accuracy(logits, targets)
    result.accuracy = correct / counted if counted else float("nan")
    kinds: dict[str, list[int]] = {}
    for p, d in zip(usable, diffs.tolist()):
        if p.preferred != "tie":
            kinds.setdefault(p.kind or p.source, []).append(int((d > 0) == (p.preferred == "a")))
    result.by_kind = {k: (sum(v) / len(v), len(v)) for k, v in sorted(kinds.items())}


def _ranking(result: PairEval, usable: list[Pair], scores: dict[Path, float]) -> None:
    """Faces whose ground truth > restored > full-strength degraded all hold, and mean role scores."""
    per_group: dict[str, dict[str, Pair]] = {}
    roles: dict[str, set[Path]] = {}
    for p in usable:
        if p.kind in ("gt>restored", "restored>degraded"):
            per_group.setdefault(p.group, {})[p.kind] = p
            a_role, b_role = _ROLES[p.kind]
            roles.setdefault(a_role, set()).add(p.image_a)
            roles.setdefault(b_role, set()).add(p.image_b)
    full = [g for g in per_group.values() if len(g) == 2]
    if full:
        ok = [scores[g["gt>restored"].image_a] > scores[g["gt>restored"].image_b] > scores[g["restored>degraded"].image_b] for g in full]
        result.ranking_faces, result.ranking_correct = len(full), sum(ok) / len(ok)
    result.mean_scores = {role: float(np.mean([scores[x] for x in xs])) for role, xs in roles.items()}


# ------------------------------------------------------------------ model setup
def build_model(cfg: FrmTrainConfig, checkpoint: Path | None) -> FaceRewardModel:
    """From the checkpoint when resuming, else from `init`, else a fresh model of `[model]`."""
    if checkpoint is not None:
        model = FaceRewardModel.from_pretrained(checkpoint / "model")
    elif cfg.init:
        model = load_frm(cfg.init, clip=cfg.clip)
    else:
        model = FaceRewardModel(FrmConfig.from_dict(cfg.model))
    if model.config.backbone == "open_clip":
        model.backbone.lock(cfg.unlocked_image_groups, cfg.unlocked_text_layers)
    return model.train()


def make_optimizer(model: FaceRewardModel, cfg: FrmTrainConfig) -> torch.optim.Optimizer:
    """AdamW with no weight decay on gains, biases and the temperature (CLIP's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _batches(data: PairDataset, cfg: FrmTrainConfig, start_step: int) -> Iterator[tuple]:
    """Endless shuffled (or kind-weighted) batches, seeded by (seed, epoch, step at start)."""
    epoch = 0
    weights = [cfg.kind_sampling.get(p.kind, 1.0) for p in data.pairs] if cfg.kind_sampling else None
    while True:
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + start_step)
        order = {"sampler": WeightedRandomSampler(weights, len(weights), generator=gen)} if weights else {"shuffle": True, "generator": gen}
        loader = DataLoader(data, batch_size=cfg.batch_size, drop_last=len(data) > cfg.batch_size, collate_fn=collate_pairs, **order)
        for batch in loader:
            if batch is not None:
                yield batch
        epoch += 1


# ------------------------------------------------------------------ the loop
class FrmMethod(TrainingMethod):
    """Bradley-Terry training as a `run_training` method; held-out pairs are scored every
    `val_every` steps and at the end. Under torchrun every process draws the same batches and
    trains on its own rows of each, with gradients averaged, so N processes see N times the
    pairs per second and make the same steps."""

    rate_key = "pairs_per_s"

    def __init__(self, cfg: FrmTrainConfig, on_val: Callable[[int, PairEval], None] | None = None) -> None:
        super().__init__(cfg)
        self.on_val = on_val
        pairs, self.row_errors = load_pair_files(cfg.pairs)
        self.train_pairs, self.val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
        if not self.train_pairs:
            raise InputError(
                "no labelled training pairs in " + ", ".join(cfg.pairs) + (f" ({len(self.row_errors)} bad rows)" if self.row_errors else "")
            )
        self.val, self.val_step = None, -1

    def min_lr_ratio(self) -> float:
        return self.cfg.min_lr_ratio

    def build(self, ckpt: Path | None) -> None:
        random.seed(self.cfg.seed)
        self.model = build_model(self.cfg, ckpt).to(self.acc.device)
        self.opt = make_optimizer(self.model, self.cfg)

    def start(self, step: int) -> None:
        self.data = PairDataset(self.train_pairs, self.model.config.image_size, self.cfg.flip, self.cfg.source_weights)
        self.batches = _batches(self.data, self.cfg, step)

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        dev, model = self.acc.device, self.model
        a, b, t, w, caps = self._my_rows(next(self.batches))
        loss, logits = bt_loss(model, a.to(dev), b.to(dev), t.to(dev), w.to(dev), caps if model.uses_captions else None)
        self.set_lr(step)
        update(self.acc, self.opt, loss, [p for p in model.parameters() if p.requires_grad], self.cfg.grad_clip, average=True)
        correct, counted = pair_accuracy(logits.cpu(), t)
        return {"loss": float(loss.detach()), "train_accuracy": correct / counted if counted else float("nan")}, len(t)

    def _my_rows(self, batch: tuple) -> tuple:
        """This process's rows of a batch every process drew alike (all rows on one process)."""
        n, rank = self.acc.num_processes, self.acc.process_index
        if n == 1:
            return batch
        a, b, t, w, caps = batch
        if len(t) < n:
            raise InputError(f"batch_size {len(t)} is smaller than the {n} processes; raise batch_size")
        return a[rank::n], b[rank::n], t[rank::n], w[rank::n], caps[rank::n] if caps is not None else None

    def log_row(self, step: int, terms: dict[str, float]) -> dict[str, Any]:
        return {"loss": round(terms["loss"], 5), "train_accuracy": round(terms["train_accuracy"], 4)}

    def after_step(self, step: int, log: JsonlLog) -> None:
        if self.val_pairs and step % self.cfg.val_every == 0:
            self._validate(step, log)

    def before_final_save(self, step: int, log: JsonlLog) -> None:
        if self.val_pairs and self.val_step != step:
            self._validate(step, log)

    def _validate(self, step: int, log: JsonlLog) -> None:
        self.val, self.val_step = evaluate_pairs(self.model, self.val_pairs), step
        if self.acc.is_main_process:
            log.write(step=step, val_accuracy=round(self.val.accuracy, 4), val_loss=round(self.val.loss, 5), val_by_kind=self.val.by_kind)
            if self.on_val:
                self.on_val(step, self.val)

    def save_model(self, folder: Path) -> None:
        self.model.save_pretrained(folder)

    def finish(self, run_dir: Path) -> None:
        self.model.eval().save_pretrained(run_dir / "final", dtype=torch.float16 if self.cfg.save_dtype == "fp16" else None)

    def results(self) -> dict[str, Any]:
        return {
            "train_pairs": len(self.train_pairs),
            "val_pairs": len(self.val_pairs),
            "val": self.val,
            "row_errors": self.row_errors,
            "unreadable": dict(self.data.bad_files),
        }


def train_frm(
    cfg: FrmTrainConfig,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_val: Callable[[int, PairEval], None] | None = None,
) -> RunResult:
    """Train (or resume) an FRM; the final model is saved to run_dir/final. The result's
    `last_losses` hold `loss` and `train_accuracy`; its extras the pair counts, the last
    validation (`val`), the skipped rows and the unreadable files."""
    return run_training(FrmMethod(cfg, on_val), run_dir, device, resume, max_minutes, on_step)


# ------------------------------------------------------------------ online updates (ReFL's dynamic FRM)
def unlocked_parameters(model: FaceRewardModel, image_groups: int, text_layers: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The FRM's parameters the dynamic FRM may train: the last `image_groups` image groups and
    `text_layers` text layers (the towers' own `lock`), plus `logit_scale`. The model is left with
    requires_grad off everywhere (`preference_step` turns it on for the step only)."""
    model.requires_grad_(True)
    model.backbone.lock(image_groups, text_layers)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.requires_grad_(False)
    return named


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """HPSv2's and DiffusionReward's rule: no decay on biases, norms, gains and the temperature."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "norm" in name or "bias" in name or "logit_scale" in name


def dynamic_frm_optimizer(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the unlocked parameters, weight decay on the decayed group only."""
    decay = [p for n, p in named if not no_weight_decay(n, p)]
    other = [p for n, p in named if no_weight_decay(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr)


def preference_step(
    model: FaceRewardModel,
    opt: torch.optim.Optimizer,
    preferred: torch.Tensor,
    other: torch.Tensor,
    grad_clip: float = 1.0,
    captions: list[str] | None = None,
    weight: float = 1.0,
) -> tuple[float, float]:
    """One step that teaches `model` to prefer `preferred[i]` over `other[i]` (Bx3xHxW in [0, 1]),
    both judged against caption i.

    Used by `refl` to keep the judge ahead of the generator (ground truth over current
    restorations): for one pair, the 2-way softmax cross-entropy over logit_scale * <t, i> with the
    preferred image as the label is this Bradley-Terry loss. `weight` scales the loss before the
    gradient clip (DiffusionReward: 0.1). The model's mode is left as it is (eval keeps BatchNorm
    statistics fixed) and only the optimizer's parameters get grads, during the step only.
    Returns (unweighted loss, pairwise accuracy before the step).
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    caps = list(captions) if captions is not None and model.uses_captions else None
    try:
        with torch.enable_grad():
            n = preferred.shape[0]
            ones = torch.ones(n, device=preferred.device)
            loss, logits = bt_loss(model, preferred.detach(), other.detach(), ones, ones, caps)
            opt.zero_grad(set_to_none=True)
            (weight * loss).backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
    correct, counted = pair_accuracy(logits.float().cpu(), ones.cpu())
    return float(loss.detach()), correct / max(counted, 1)
