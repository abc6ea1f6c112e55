"""NIQE, the Natural Image Quality Evaluator (Mittal, Soundararajan and Bovik, 2013).

A no-reference score (lower is better): how far the statistics of an image's locally normalised
luminance are from those of pristine natural images.

    grey (MATLAB rgb2gray, integers) -> crop to whole 96x96 patches
    for two scales (full, then MATLAB bicubic imresize by 0.5):
        MSCN = (I - mu) / (sigma + 1), mu and sigma from a 7x7 Gaussian (sigma 7/6), replicate border
        per patch (96 px, then 48 px): AGGD fit of MSCN (shape, mean of the two scales) and, for the
        products of MSCN with its horizontal, vertical and two diagonal neighbours (circular shifts
        inside the patch), AGGD fits (shape, mean, left scale, right scale)  -> 18 features
    36 features per patch; the patches' mean and covariance (rows with NaN dropped) against the
    pristine model's:  NIQE = sqrt((mu_p - mu)^T pinv((C_p + C) / 2) (mu_p - mu))

The pristine mean/covariance are the official MATLAB release's (`modelparameters.mat`), read
from `weights/niqe/niqe_pris_params.npz`. Like MATLAB's `computequality.m`, every patch is used
at test time; the sharpness selection of the reference (patches whose mean local deviation
exceeds 0.75 of the sharpest's) is what built the pristine model from natural images and is
available here as `sharpness_threshold` for experiments, off by default so numbers match the
published implementation.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from facerestore_cli.metrics.base import Metric, rgb_to_grey
from facerestore_cli.paths import NIQE_PARAMS

PATCH = 96


# ------------------------------------------------------------------ MATLAB imresize (bicubic)
def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def _resize_weights(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output sample: source indices (0-based, mirrored at the ends) and normalised weights."""
    width = 4.0
    if scale < 1:  # antialiasing: stretch the kernel by 1/scale
        kernel = lambda t: scale * _cubic(scale * t)  # noqa: E731
        width = width / scale
    else:
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # 1-based source coordinate of each output sample
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    w = kernel(u[:, None] - idx)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(w != 0, axis=0)
    return idx[:, keep], w[:, keep]


def imresize_bicubic(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB `imresize(img, scale)` (bicubic, antialiased when shrinking) of a 2-D float image."""
    out = img.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        idx, w = _resize_weights(n, int(math.ceil(n * scale)), scale)
        moved = np.moveaxis(out, axis, 0)
        res = np.einsum("ot,ot...->o...", w, moved[idx])
        out = np.moveaxis(res, 0, axis)
    return out


# ------------------------------------------------------------------ AGGD fits
_GAM = np.linspace(0.2, 10.0, 9801)  # MATLAB 0.2:0.001:10


@lru_cache(maxsize=1)
def _gamma_table() -> np.ndarray:
    g1 = np.array([math.gamma(1 / a) for a in _GAM])
    g2 = np.array([math.gamma(2 / a) for a in _GAM])
    g3 = np.array([math.gamma(3 / a) for a in _GAM])
    aggd_ratio = g2**2 / (g1 * g3)  # E[|x|]^2 / E[x^2] of a GGD as a function of its shape
    return aggd_ratio


def fit_aggd(x: np.ndarray) -> tuple[float, float, float]:
    """Shape and left/right scales (beta) of an asymmetric generalised Gaussian, by moment matching.

    The shape is looked up on MATLAB's grid 0.2:0.001:10 (nan when one side is empty).
    """
    aggd_ratio = _gamma_table()
    neg, pos = x[x < 0], x[x > 0]
    if neg.size == 0 or pos.size == 0:
        return (float("nan"),) * 3
    left = math.sqrt(float(np.mean(neg**2)))
    right = math.sqrt(float(np.mean(pos**2)))
    g = left / right
    r_hat = float(np.mean(np.abs(x))) ** 2 / float(np.mean(x**2))
    r_norm = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = float(_GAM[np.argmin((aggd_ratio - r_norm) ** 2)])
    k = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return alpha, left * k, right * k


#: Neighbour offsets (rows, cols) as MATLAB circshift: horizontal, vertical, two diagonals.
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


def patch_features(mscn: np.ndarray) -> list[float]:
    """The 18 NIQE features of one patch of MSCN coefficients.

    AGGD of the coefficients: shape, mean scale (beta_l + beta_r) / 2; then for the products with
    each neighbour (circular shift inside the patch): shape, mean, beta_l, beta_r.
    """
    alpha, bl, br = fit_aggd(mscn.ravel())
    feats = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        pair = (mscn * np.roll(mscn, shift, axis=(0, 1))).ravel()
        alpha, bl, br = fit_aggd(pair)
        mean = (br - bl) * math.gamma(2 / alpha) / math.gamma(1 / alpha) if math.isfinite(alpha) else float("nan")
        feats.extend([alpha, mean, bl, br])
    return feats


# ------------------------------------------------------------------ NIQE
def mscn(img: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-subtracted contrast-normalised coefficients and the local deviation map."""
    mu = cv2.filter2D(img, cv2.CV_64F, window, borderType=cv2.BORDER_REPLICATE)
    sigma = np.sqrt(np.abs(cv2.filter2D(img * img, cv2.CV_64F, window, borderType=cv2.BORDER_REPLICATE) - mu * mu))
    return (img - mu) / (sigma + 1), sigma


def niqe_features(grey: np.ndarray, window: np.ndarray, patch: int = PATCH, sharpness_threshold: float | None = None) -> np.ndarray:
    """Patches x 36 feature matrix of a grey image (values 0..255)."""
    rows, cols = grey.shape[0] // patch, grey.shape[1] // patch
    img = grey[: rows * patch, : cols * patch].astype(np.float64)
    per_scale, sharp = [], None
    for scale in (1, 2):
        coef, sigma = mscn(img, window)
        p = patch // scale
        blocks = [(r * p, c * p) for c in range(cols) for r in range(rows)]  # column-major like blkproc
        per_scale.append(np.array([patch_features(coef[y : y + p, x : x + p]) for y, x in blocks]))
        if scale == 1:
            sharp = np.array([sigma[y : y + p, x : x + p].mean() for y, x in blocks])
            img = imresize_bicubic(img, 0.5)
    feats = np.concatenate(per_scale, axis=1)
    if sharpness_threshold is not None and len(feats):
        feats = feats[sharp > sharpness_threshold * sharp.max()]
    return feats


def niqe_from_features(feats: np.ndarray, mu_p: np.ndarray, cov_p: np.ndarray) -> float:
    good = feats[~np.isnan(feats).any(axis=1)]
    if len(good) < 2:  # a covariance needs at least two patches
        return float("nan")
    mu = np.nanmean(feats, axis=0)
    cov = np.cov(good, rowvar=False)
    d = (mu_p - mu).reshape(1, -1)
    q = float((d @ np.linalg.pinv((cov_p + cov) / 2) @ d.T).item())
    return math.sqrt(max(q, 0.0))


@lru_cache(maxsize=4)
def load_pristine(path: str = str(NIQE_PARAMS)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.load(path)
    return data["mu_pris_param"].reshape(-1), data["cov_pris_param"], data["gaussian_window"]


def niqe(image: np.ndarray, sharpness_threshold: float | None = None, params: Path | None = None) -> float:
    """NIQE of a uint8 RGB (or 2-D grey) image; nan when it holds fewer than two 96x96 patches."""
    mu_p, cov_p, window = load_pristine(str(params or NIQE_PARAMS))
    grey = rgb_to_grey(image) if image.ndim == 3 else np.asarray(image, np.float64)
    if (grey.shape[0] // PATCH) * (grey.shape[1] // PATCH) < 2:
        return float("nan")
    return niqe_from_features(niqe_features(grey, window, PATCH, sharpness_threshold), mu_p, cov_p)


class NIQE(Metric):
    name = "niqe"
    full_reference = False
    lower_better = True
    description = "NIQE (MATLAB release's pristine model), on grey; needs >= 2 whole 96x96 patches"

    def __init__(self, sharpness_threshold: float | None = None) -> None:
        self.sharpness_threshold = sharpness_threshold

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not NIQE_PARAMS.is_file():
            return f"pristine model {NIQE_PARAMS} is missing (see weights/niqe/README.md to rebuild it)"
        return None

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        return niqe(image, self.sharpness_threshold)
