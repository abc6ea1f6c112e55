"""The hybrid annotation pipeline: an SVM trained on human-labelled pairs labels the rest.

Human labels are few and slow to make; the paper trains an SVM on the human-labelled subset and
lets it label the remaining pairs, keeping only the labels it is confident about. Each image is
described by cheap no-reference quality features (sharpness at two scales, gradient energy,
high-frequency share of the spectrum, a noise estimate, 8x8 blockiness, contrast, colourfulness,
and optionally the current FRM's score); a pair is the difference of its two images' features.

The SVM (scikit-learn `SVC`, kernel, C, gamma and feature scaling configurable) is fitted on both
orders of every human pair so that swapping a and b flips its answer, with Platt-scaled
probabilities. Before it labels anything, its agreement with human labels it did not see (a
held-out share of the human pairs, split by face) is measured and reported: that is the model
that then labels the candidates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from facerestore_cli.data.annotations import Pair, pair_group
from facerestore_cli.errors import InputError
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import read_image

FEATURE_SIZE = 128
FEATURE_NAMES = (
    "log_laplacian_var_128",
    "log_laplacian_var_64",
    "mean_gradient",
    "hf_share_high",
    "hf_share_mid",
    "noise_sigma",
    "blockiness",
    "contrast",
    "colourfulness",
)
SCALINGS = ("standard", "minmax", "none")
KERNELS = ("rbf", "linear", "poly", "sigmoid")


@dataclass
class SvmConfig:
    kernel: str = "rbf"
    C: float = 1.0
    gamma: str | float = "scale"
    degree: int = 3
    scaling: str = "standard"
    min_confidence: float = 0.8
    holdout: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise InputError(f"kernel must be one of {', '.join(KERNELS)}, not {self.kernel!r}")
        if self.scaling not in SCALINGS:
            raise InputError(f"scaling must be one of {', '.join(SCALINGS)}, not {self.scaling!r}")
        if not 0.5 <= self.min_confidence <= 1:
            raise InputError(f"min_confidence must be in [0.5, 1], not {self.min_confidence}")
        if not 0 < self.holdout < 1:
            raise InputError(f"holdout must be in (0, 1), not {self.holdout}")


# ------------------------------------------------------------------ image features
def _grey(rgb: np.ndarray, size: int) -> np.ndarray:
    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float64)


def _spectrum_shares(grey: np.ndarray) -> tuple[float, float]:
    """Share of spectral power above half and between a quarter and half of Nyquist."""
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    h, w = grey.shape
    yy, xx = np.mgrid[-h // 2 : h - h // 2, -w // 2 : w - w // 2]
    radius = np.sqrt((yy / (h / 2)) ** 2 + (xx / (w / 2)) ** 2)
    total = power.sum() + 1e-12
    return float(power[radius > 0.5].sum() / total), float(power[(radius > 0.25) & (radius <= 0.5)].sum() / total)


def _noise_sigma(grey: np.ndarray) -> float:
    """Immerkaer's fast noise estimate: a Laplacian-difference kernel cancels image structure."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    h, w = grey.shape
    response = np.abs(cv2.filter2D(grey, -1, kernel)[1:-1, 1:-1]).sum()
    return float(np.sqrt(np.pi / 2) * response / (6 * (w - 2) * (h - 2)))


def _blockiness(grey: np.ndarray) -> float:
    """Mean jump across 8-px block borders over the mean jump elsewhere (JPEG blocks)."""
    d = np.abs(np.diff(grey, axis=1))
    border = d[:, 7::8].mean()
    inside = np.delete(d, np.s_[7::8], axis=1).mean() + 1e-6
    return float(border / inside)


def _colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness (desaturation and colour noise move it)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2))


def image_features(rgb: np.ndarray) -> np.ndarray:
    """The hand-made quality features of one face (order: FEATURE_NAMES)."""
    g128, g64 = _grey(rgb, FEATURE_SIZE), _grey(rgb, FEATURE_SIZE // 2)
    native = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
    gx, gy = cv2.Sobel(g128, cv2.CV_64F, 1, 0), cv2.Sobel(g128, cv2.CV_64F, 0, 1)
    high, mid = _spectrum_shares(g128)
    return np.array(
        [
            np.log1p(cv2.Laplacian(g128, cv2.CV_64F).var()),
            np.log1p(cv2.Laplacian(g64, cv2.CV_64F).var()),
            np.sqrt(gx**2 + gy**2).mean(),
            np.log(high + 1e-9),
            np.log(mid + 1e-9),
            _noise_sigma(native),
            _blockiness(native),
            g128.std(),
            _colourfulness(cv2.resize(rgb, (FEATURE_SIZE, FEATURE_SIZE), interpolation=cv2.INTER_AREA)),
        ]
    )


class FeatureCache:
    """Features per image file, computed once; with an FRM its score is one more feature."""

    def __init__(self, frm=None) -> None:
        self.frm = frm
        self.cache: dict[Path, np.ndarray] = {}
        self.unreadable: dict[str, str] = {}

    def fill(self, paths: Sequence[Path], on_image: Callable[[Path], None] | None = None) -> None:
        todo = [p for p in dict.fromkeys(paths) if p not in self.cache and str(p) not in self.unreadable]
        images: dict[Path, np.ndarray] = {}
        for p in todo:
            try:
                images[p] = read_image(p).rgb
            except MediaError as err:
                self.unreadable[str(p)] = err.reason
            if on_image:
                on_image(p)
        scores = self.frm.score_images(list(images.values())) if self.frm is not None and images else []
        for i, (p, rgb) in enumerate(images.items()):
            f = image_features(rgb)
            self.cache[p] = np.append(f, scores[i]) if self.frm is not None else f

    def pair(self, p: Pair) -> np.ndarray | None:
        a, b = self.cache.get(p.image_a), self.cache.get(p.image_b)
        return None if a is None or b is None else a - b


# ------------------------------------------------------------------ the SVM
def make_svm(cfg: SvmConfig, n_per_class: int):
    """scikit-learn pipeline: optional scaling, then an SVC with Platt-scaled (sigmoid) probabilities."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler, StandardScaler
    from sklearn.svm import SVC

    gamma = cfg.gamma if isinstance(cfg.gamma, str) else float(cfg.gamma)
    svc = SVC(kernel=cfg.kernel, C=cfg.C, gamma=gamma, degree=cfg.degree, random_state=cfg.seed)
    calibrated = CalibratedClassifierCV(svc, method="sigmoid", cv=max(2, min(5, n_per_class)), ensemble=False)
    scaler = {"standard": [StandardScaler()], "minmax": [MinMaxScaler()], "none": []}[cfg.scaling]
    return make_pipeline(*scaler, calibrated)


def _xy(pairs: Sequence[Pair], feats: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    """Both orders of every decided pair: (f_a - f_b, a wins) and (f_b - f_a, b wins)."""
    xs, ys = [], []
    for p in pairs:
        d = feats.pair(p)
        if d is None or p.preferred not in ("a", "b"):
            continue
        y = int(p.preferred == "a")
        xs += [d, -d]
        ys += [y, 1 - y]
    return np.array(xs), np.array(ys)


def prob_a(model, diffs: np.ndarray) -> np.ndarray:
    """P(a preferred), averaged over both orders so that swapping a and b gives 1 - p exactly."""
    cls = list(model.classes_).index(1)
    return 0.5 * (model.predict_proba(diffs)[:, cls] + 1 - model.predict_proba(-diffs)[:, cls])


@dataclass
class SvmReport:
    """How the SVM did on human labels it did not see, and what it labelled."""

    human_pairs: int = 0
    train_pairs: int = 0
    holdout_pairs: int = 0
    holdout_agreement: float = float("nan")
    holdout_confident_agreement: float = float("nan")
    holdout_confident_share: float = float("nan")
    candidates: int = 0
    labelled: int = 0
    dropped_low_confidence: int = 0
    config: dict = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


MIN_HUMAN_PAIRS = 6


def _holdout_split(pairs: list[Pair], cfg: SvmConfig) -> tuple[list[Pair], list[Pair]]:
    """Hold out `holdout` of the faces (seeded), so no face is on both sides; by pair when faces are few."""
    rng = np.random.default_rng(cfg.seed)
    groups = sorted({pair_group(p) for p in pairs})
    if len(groups) >= 5:
        held_groups = set(rng.permutation(groups)[: max(1, int(round(len(groups) * cfg.holdout)))].tolist())
        held = [p for p in pairs if pair_group(p) in held_groups]
        train = [p for p in pairs if pair_group(p) not in held_groups]
        if len(train) >= MIN_HUMAN_PAIRS // 2:
            return train, held
    order = rng.permutation(len(pairs))
    cut = max(1, int(round(len(pairs) * cfg.holdout)))
    return [pairs[i] for i in order[cut:]], [pairs[i] for i in order[:cut]]


def _key(p: Pair) -> frozenset:
    return frozenset((Path(p.image_a).resolve(), Path(p.image_b).resolve()))


def auto_annotate(
    human: Sequence[Pair],
    candidates: Sequence[Pair],
    cfg: SvmConfig,
    frm=None,
    on_image: Callable[[Path], None] | None = None,
) -> tuple[list[Pair], SvmReport]:
    """Fit on the human pairs (minus a held-out share), report agreement, label the candidates."""
    decided = [p for p in human if p.preferred in ("a", "b")]
    if len(decided) < MIN_HUMAN_PAIRS:
        raise InputError(f"the SVM needs at least {MIN_HUMAN_PAIRS} human pairs with a preference (not ties), got {len(decided)}")
    done = {_key(p) for p in human}
    todo = [p for p in candidates if _key(p) not in done]
    feats = FeatureCache(frm)
    feats.fill([x for p in list(decided) + todo for x in (p.image_a, p.image_b)], on_image)
    train, held = _holdout_split(decided, cfg)
    report = SvmReport(human_pairs=len(decided), train_pairs=len(train), holdout_pairs=len(held), candidates=len(todo), config=asdict(cfg))
    x, y = _xy(train, feats)
    if len(set(y.tolist())) < 2:
        raise InputError("the human pairs left for training the SVM are unreadable")
    model = make_svm(cfg, int(min(np.bincount(y)))).fit(x, y)
    _holdout_agreement(model, held, feats, cfg, report)
    labelled = _label(model, todo, feats, cfg, report)
    report.unreadable = dict(feats.unreadable)
    return labelled, report


def _holdout_agreement(model, held: list[Pair], feats: FeatureCache, cfg: SvmConfig, report: SvmReport) -> None:
    usable = [(p, d) for p in held if (d := feats.pair(p)) is not None]
    if not usable:
        return
    p_a = prob_a(model, np.array([d for _, d in usable]))
    agree = np.array([(pa > 0.5) == (p.preferred == "a") for (p, _), pa in zip(usable, p_a)])
    confident = np.maximum(p_a, 1 - p_a) >= cfg.min_confidence
    report.holdout_agreement = float(agree.mean())
    report.holdout_confident_share = float(confident.mean())
    report.holdout_confident_agreement = float(agree[confident].mean()) if confident.any() else float("nan")


def _label(model, todo: list[Pair], feats: FeatureCache, cfg: SvmConfig, report: SvmReport) -> list[Pair]:
    usable = [(p, d) for p in todo if (d := feats.pair(p)) is not None]
    if not usable:
        return []
    p_a = prob_a(model, np.array([d for _, d in usable]))
    out = []
    for (p, _), pa in zip(usable, p_a):
        conf = float(max(pa, 1 - pa))
        if conf < cfg.min_confidence:
            report.dropped_low_confidence += 1
            continue
        out.append(Pair(p.image_a, p.image_b, "a" if pa > 0.5 else "b", "svm", p.kind, p.group, p.caption, weight=conf, confidence=conf))
    report.labelled = len(out)
    return out
