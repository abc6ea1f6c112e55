"""Image-quality metrics: values on known cases, orderings, and the registry's honesty about what is missing."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import socket
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

import facerestore_cli.rewards  # noqa: F401  (the reward models add frm and lrpo_reward to the registry)
from facerestore_cli.metrics import (
    EVAL_EXTRA,
    MetricUnavailable,
    available_metrics,
    create_metric,
    external,
    identity,
    list_metrics,
    metric_info,
    unavailable_metrics,
)
from facerestore_cli.metrics import niqe as niqe_mod
from facerestore_cli.metrics.base import rgb_to_luma
from facerestore_cli.metrics.classic import PSNR_CAP_DB, psnr, ssim, ssim_luma

LFW = "faces/train/lfw250"
CELEBA_VAL = "faces/val/celeba128"


def textured(size: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture: structure at several scales, like a photo."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.float64)
    for s in (4, 8, 16, 32):
        small = rng.uniform(0, 255, (max(2, size // s), max(2, size // s), 3))
        img += cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    img = (img - img.min()) / (img.max() - img.min()) * 235 + 10
    return img.astype(np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1].copy()


# ------------------------------------------------------------------ PSNR / SSIM
def test_psnr_identical_is_capped_and_known_offset():
    img = textured()
    assert psnr(img, img) == PSNR_CAP_DB
    # a uniform RGB offset of 10 moves luma by 10 * (65.481 + 128.553 + 24.966) / 255 everywhere
    shifted = (img.astype(np.int16) + 10).clip(0, 255).astype(np.uint8)
    dy = rgb_to_luma(shifted) - rgb_to_luma(img)
    expected = 10 * math.log10(255**2 / float(np.mean(dy**2)))
    assert psnr(shifted, img) == pytest.approx(expected, abs=1e-9)
    assert create_metric("psnr")(shifted, img) == pytest.approx(expected, abs=1e-9)


def test_ssim_identical_is_one_and_falls_with_blur():
    img = textured(128)
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    values = [ssim(cv2.GaussianBlur(img, (0, 0), s), img) for s in (0.7, 1.5, 3.0, 6.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.9


def test_ssim_hand_computed_constant_images():
    # constant images: no variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1)
    a, b = np.full((32, 32), 100.0), np.full((32, 32), 150.0)
    c1 = (0.01 * 255) ** 2
    assert ssim_luma(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1), rel=1e-12)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image not installed (optional cross-check)")
    img = textured(96, seed=1)
    for other in (cv2.GaussianBlur(img, (0, 0), 2), textured(96, seed=2)):
        x, y = rgb_to_luma(other), rgb_to_luma(img)
        ref = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
        assert ssim(other, img) == pytest.approx(ref, abs=1e-9)


# ------------------------------------------------------------------ NIQE
def test_niqe_matlab_imresize_keeps_constants_and_halves():
    x = np.full((10, 14), 7.0)
    out = niqe_mod.imresize_bicubic(x, 0.5)
    assert out.shape == (5, 7)
    np.testing.assert_allclose(out, 7.0)


def test_niqe_needs_two_patches():
    assert math.isnan(niqe_mod.niqe(textured(150)))  # one 96x96 patch only
    assert math.isfinite(niqe_mod.niqe(textured(192)))


def test_niqe_reference_value_and_ordering(shared_data):
    img = read_rgb(shared_data / LFW / "Ariel_Sharon_0002.jpg")
    metric = create_metric("niqe")
    sharp = metric(img)
    # BasicSR's MATLAB-matching NIQE gives 7.54700 on the grey of this photo (checked when written)
    assert sharp == pytest.approx(7.5470, abs=2e-3)
    blurred = metric(cv2.GaussianBlur(img, (0, 0), 2.0))
    noisy = metric(np.clip(img + np.random.default_rng(0).normal(0, 25, img.shape), 0, 255).astype(np.uint8))
    assert sharp < blurred and sharp < noisy, (sharp, blurred, noisy)


# ------------------------------------------------------------------ identity
@pytest.fixture(scope="module")
def aligned_faces(shared_data):
    reason = identity.identity_unavailable_reason()
    if reason:
        pytest.skip(f"identity metric unavailable: {reason}")
    from facerestore_cli.faces.align import estimate_affine, warp_faces
    from facerestore_cli.faces.detector import build_detector, detect_padded

    detector = build_detector("mtcnn")
    out = {}
    for key, path in {"a": CELEBA_VAL + "/201605.jpg", "b": CELEBA_VAL + "/201607.jpg"}.items():
        rgb = read_rgb(shared_data / path)
        faces = detect_padded(detector, rgb)
        assert faces, f"no face found in {path}"
        out[key] = warp_faces(rgb, [estimate_affine(faces[0].landmarks, 512)], 512)[0]
    return out


def test_identity_same_face_high_other_person_lower(aligned_faces):
    a, b = aligned_faces["a"], aligned_faces["b"]
    sim, dist = create_metric("identity"), create_metric("identity_dist")
    assert sim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert dist(a, a) == pytest.approx(0.0, abs=1e-6)
    blurred = cv2.GaussianBlur(a, (0, 0), 3.0)
    same, other = sim(blurred, a), sim(b, a)
    assert other < same < 1.0, (same, other)
    assert dist(b, a) > dist(blurred, a)
    assert dist(b, a) > identity.DLIB_SAME_PERSON - 0.1  # dlib calls people within 0.6 the same


def test_lrpo_reward_prefers_the_ground_truth(aligned_faces):
    """The reward `lrpo` trains against, as an eval metric: the truth beats a blurred copy beats another face."""
    a, b = aligned_faces["a"], aligned_faces["b"]
    reward = create_metric("lrpo_reward")
    blurred = cv2.resize(cv2.resize(a, (64, 64), interpolation=cv2.INTER_AREA), a.shape[:2][::-1], interpolation=cv2.INTER_LINEAR)
    scores = reward.score_batch([a, blurred, b], [a, a, a])
    assert scores[0] > scores[1] > scores[2], scores
    assert metric_info("lrpo_reward").full_reference and not metric_info("lrpo_reward").lower_better


def test_identity_rect_scales_with_crop_size():
    assert identity.face_rect((512, 512)) == identity.FFHQ_RECT_512
    assert identity.face_rect((128, 128)) == tuple(round(v / 4) for v in identity.FFHQ_RECT_512)


# ------------------------------------------------------------------ registry
def test_registry_lists_everything_and_explains_the_rest():
    names = list_metrics()
    for n in ("psnr", "ssim", "niqe", "identity", "identity_dist", "lpips"):
        assert n in names
    assert any(n.startswith("pyiqa:") for n in names)
    avail, unavail = available_metrics(), unavailable_metrics()
    assert {"psnr", "ssim", "niqe"} <= set(avail)
    assert set(avail).isdisjoint(unavail) and set(avail) | set(unavail) == set(names)
    for name, reason in unavail.items():
        assert reason and "\n" not in reason
        with pytest.raises(MetricUnavailable, match=name):
            create_metric(name)
    info = metric_info("niqe")
    assert (info.full_reference, info.lower_better) == (False, True)
    assert metric_info("ssim").kind == "FR" and not metric_info("ssim").lower_better
    with pytest.raises(ValueError, match="unknown metric"):
        create_metric("nope")


def test_identity_unavailable_without_dlib(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dlib" else real(name, *a))
    reason = metric_info("identity").unavailable_reason
    assert reason and "dlib" in reason and EVAL_EXTRA in reason
    assert "identity" not in available_metrics()
    with pytest.raises(MetricUnavailable, match="dlib"):
        create_metric("identity_dist")


def test_niqe_unavailable_without_params(monkeypatch, tmp_path):
    monkeypatch.setattr(niqe_mod, "NIQE_PARAMS", tmp_path / "missing.npz")
    assert "missing.npz" in metric_info("niqe").unavailable_reason


def test_lpips_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setattr(external, "alexnet_checkpoint", lambda: tmp_path / external.ALEXNET_FILE)
    reason = metric_info("lpips").unavailable_reason
    assert reason and external.ALEXNET_FILE in reason


class Tripwire:
    """Stands in for the socket functions during a test: a call records where it went and raises,
    so nothing connects even when the guard under test fails to refuse."""

    def __init__(self):
        self.calls: list[tuple] = []

        def trip(*args, **_kwargs):
            self.calls.append(args)
            raise ConnectionRefusedError("tripwire: a test connection got past the network guard")

        self.connect, self.connect_ex, self.create_connection = trip, trip, trip

    def installed(self) -> bool:
        return (socket.socket.connect, socket.socket.connect_ex, socket.create_connection) == (
            self.connect,
            self.connect_ex,
            self.create_connection,
        )


@pytest.fixture
def tripwire(monkeypatch) -> Tripwire:
    wire = Tripwire()
    monkeypatch.setattr(socket.socket, "connect", wire.connect)
    monkeypatch.setattr(socket.socket, "connect_ex", wire.connect_ex)
    monkeypatch.setattr(socket, "create_connection", wire.create_connection)
    return wire


@pytest.fixture
def fake_pyiqa(monkeypatch, tripwire: Tripwire):
    """A stand-in pyiqa: `piqe` builds without weights; `musiq` tries to download (and must be stopped)."""

    class Model:
        lower_better = True

        def __call__(self, x):
            return x.mean(dim=(1, 2, 3))

    def create_metric(name, device=None, as_loss=False):
        if name == "piqe":
            return Model()
        with socket.socket() as s:  # what a download does first (an address literal: no DNS lookup either)
            s.connect(("192.0.2.1", 443))
        raise AssertionError("the network guard should have stopped this")

    mod = types.ModuleType("pyiqa")
    mod.__spec__ = importlib.machinery.ModuleSpec("pyiqa", None)
    mod.create_metric = create_metric
    monkeypatch.setitem(sys.modules, "pyiqa", mod)
    external._build_pyiqa.cache_clear()
    yield tripwire
    external._build_pyiqa.cache_clear()


def test_pyiqa_metrics_only_with_weights_on_disk(fake_pyiqa):
    assert "pyiqa:piqe" in available_metrics()
    reason = metric_info("pyiqa:musiq").unavailable_reason
    assert reason and "not on disk" in reason
    metric = create_metric("pyiqa:piqe")
    assert metric.lower_better and not metric.full_reference
    img = np.full((32, 32, 3), 51, np.uint8)
    assert metric(img) == pytest.approx(0.2, abs=1e-6)
    # the guard refused the download itself (the tripwire saw nothing), and put back what was there
    assert fake_pyiqa.calls == [], f"a connection got past the guard: {fake_pyiqa.calls}"
    assert fake_pyiqa.installed(), "the guard must restore the socket functions it replaced"
