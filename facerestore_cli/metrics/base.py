"""What every image-quality metric is: a name, a direction, full- or no-reference, and a score.

Images are numpy `uint8` RGB `HxWx3` (the library's boundary convention). A full-reference
metric compares an image with its ground truth of the same size; a no-reference metric judges an
image alone. Metrics never invent a number: a metric whose weights or packages are missing is
*unavailable* and says why (`unavailable_reason`), and a score that cannot be computed for one
image (e.g. NIQE of an image smaller than one 96 px patch) is `nan`, which averages skip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from facerestore_cli.errors import FacerestoreError

EVAL_EXTRA = 'pip install -e ".[eval]"'


class MetricUnavailable(FacerestoreError, RuntimeError):
    """A metric cannot run here (missing package or weights); the message is the one-line reason."""


@dataclass(frozen=True)
class MetricInfo:
    """What a registered metric is, without loading it."""

    name: str
    full_reference: bool
    lower_better: bool
    description: str
    #: None when the metric can run here, else a one-line reason (what to install or place where).
    unavailable_reason: str | None = None

    @property
    def kind(self) -> str:
        return "FR" if self.full_reference else "NR"

    @property
    def direction(self) -> str:
        return "lower is better" if self.lower_better else "higher is better"

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None


class Metric:
    """Base class: subclasses set the class attributes and implement `score` (or `score_batch`)."""

    name: str = ""
    full_reference: bool = True
    lower_better: bool = False
    description: str = ""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None if the metric can be created here; otherwise why not (checked without loading weights)."""
        return None

    @classmethod
    def info(cls) -> MetricInfo:
        return MetricInfo(cls.name, cls.full_reference, cls.lower_better, cls.description, cls.unavailable_reason())

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        raise NotImplementedError

    def score_batch(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray] | None = None) -> list[float]:
        """Scores of several images (metrics that batch on a device override this)."""
        if self.full_reference:
            if references is None or len(references) != len(images):
                raise ValueError(f"{self.name} is full-reference: give one reference per image")
            return [self.score(im, ref) for im, ref in zip(images, references)]
        return [self.score(im) for im in images]

    def __call__(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        if self.full_reference:
            if reference is None:
                raise ValueError(f"{self.name} is full-reference: it needs the ground-truth image")
            check_pair(image, reference)
        else:
            check_image(image)
        return self.score(image, reference)

    def __repr__(self) -> str:
        return f"<metric {self.name} ({'FR' if self.full_reference else 'NR'}, {'lower' if self.lower_better else 'higher'} is better)>"


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected a uint8 RGB HxWx3 image, got {got}")


def check_pair(image: np.ndarray, reference: np.ndarray) -> None:
    check_image(image)
    check_image(reference)
    if image.shape != reference.shape:
        raise ValueError(f"image {image.shape[:2]} and reference {reference.shape[:2]} differ in size")


def rgb_to_luma(image: np.ndarray) -> np.ndarray:
    """Y of ITU-R BT.601 YCbCr in studio range [16, 235] (MATLAB `rgb2ycbcr`), float64.

    The luma that published PSNR/SSIM numbers of face and super-resolution papers are computed on.
    """
    x = image.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def rgb_to_grey(image: np.ndarray) -> np.ndarray:
    """MATLAB `rgb2gray` of a uint8 image (rounded back to integers, as MATLAB returns uint8), float64."""
    x = image.astype(np.float64)
    return np.round(0.298936021293775 * x[..., 0] + 0.587043074451121 * x[..., 1] + 0.114020904255103 * x[..., 2])


def finite_mean(values: Sequence[float]) -> tuple[float, int]:
    """Mean over the finite values and how many there were (nan mean when none)."""
    good = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return (float(np.mean(good)) if good else float("nan")), len(good)
