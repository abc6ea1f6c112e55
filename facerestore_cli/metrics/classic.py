"""PSNR and SSIM on luma (BT.601 Y, studio range), the way face-restoration papers report them."""

from __future__ import annotations

import math

import cv2
import numpy as np

from facerestore_cli.metrics.base import Metric, rgb_to_luma

#: PSNR of identical images is infinite; it is reported as this cap so tables and JSON stay finite.
PSNR_CAP_DB = 100.0


def psnr(image: np.ndarray, reference: np.ndarray, cap: float = PSNR_CAP_DB) -> float:
    """Peak signal-to-noise ratio (dB, peak 255) on luma; identical images give `cap`."""
    mse = float(np.mean((rgb_to_luma(image) - rgb_to_luma(reference)) ** 2))
    if mse == 0.0:
        return cap
    return min(cap, 10.0 * math.log10(255.0**2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def ssim_luma(x: np.ndarray, y: np.ndarray, data_range: float = 255.0, win: int = 11, sigma: float = 1.5) -> float:
    """SSIM of Wang et al. (2004) between two single-channel float images.

    Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, local statistics with the window's
    weights (population, not sample, covariance) and the mean over the "valid" region only, i.e.
    where the whole window lies inside the image, as the authors' MATLAB `ssim_index.m` does.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError("ssim_luma needs two single-channel images of the same size")
    if min(x.shape) < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win} pixels, got {x.shape[1]}x{x.shape[0]}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    w = _gaussian_window(win, sigma)
    h = win // 2

    def filt(z: np.ndarray) -> np.ndarray:
        # "valid" correlation: cv2 filters with any border, then the border is cut away
        return cv2.filter2D(z, cv2.CV_64F, w, borderType=cv2.BORDER_REFLECT)[h:-h, h:-h]

    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM on BT.601 luma (Gaussian 11 / 1.5, data range 255)."""
    return ssim_luma(rgb_to_luma(image), rgb_to_luma(reference))


class PSNR(Metric):
    name = "psnr"
    full_reference = True
    lower_better = False
    description = f"PSNR (dB) on BT.601 luma; identical images are capped at {PSNR_CAP_DB:g} dB"

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        return psnr(image, reference)


class SSIM(Metric):
    name = "ssim"
    full_reference = True
    lower_better = False
    description = "SSIM (Wang et al. 2004, Gaussian 11/1.5) on BT.601 luma"

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        return ssim(image, reference)
