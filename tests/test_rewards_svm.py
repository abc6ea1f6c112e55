"""The hybrid annotation pipeline: quality features, the SVM labeller and its held-out agreement."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from fakes import face_like

from facerestore_cli.cli import main
from facerestore_cli.data.annotations import Pair, read_pairs, write_pairs
from facerestore_cli.data.svm import FEATURE_NAMES, SvmConfig, auto_annotate, image_features, make_svm


def test_features_see_blur_noise_and_jpeg() -> None:
    f = dict(zip(FEATURE_NAMES, image_features(face := face_like(128, 0))))
    blurred = dict(zip(FEATURE_NAMES, image_features(cv2.GaussianBlur(face, (0, 0), 2.0))))
    noisy_img = np.clip(face + np.random.default_rng(0).normal(0, 12, face.shape), 0, 255).astype(np.uint8)
    noisy = dict(zip(FEATURE_NAMES, image_features(noisy_img)))
    jpg = cv2.imdecode(cv2.imencode(".jpg", cv2.GaussianBlur(face, (0, 0), 1.0), [cv2.IMWRITE_JPEG_QUALITY, 10])[1], cv2.IMREAD_COLOR)
    clean = dict(zip(FEATURE_NAMES, image_features(cv2.GaussianBlur(face, (0, 0), 1.0))))
    assert blurred["log_laplacian_var_128"] < f["log_laplacian_var_128"] and blurred["hf_share_high"] < f["hf_share_high"]
    assert noisy["noise_sigma"] > f["noise_sigma"] + 4
    assert dict(zip(FEATURE_NAMES, image_features(jpg)))["blockiness"] > clean["blockiness"] + 0.3


@pytest.fixture(scope="module")
def blur_pairs(tmp_path_factory) -> tuple[list[Pair], list[Pair], dict]:
    """Faces blurred by known amounts; the 'human' prefers the sharper one (ground truth known)."""
    root = tmp_path_factory.mktemp("svm")
    rng = np.random.default_rng(0)
    pairs, truth = [], {}
    for i in range(40):
        face = face_like(96, i)
        s1, s2 = sorted(rng.uniform(0.2, 3.0, 2))
        paths = []
        for j, s in enumerate((s1, s2)):
            paths.append(root / f"{i}_{j}.png")
            cv2.imwrite(str(paths[-1]), cv2.GaussianBlur(face, (0, 0), s))
        a, b = (paths[0], paths[1]) if i % 2 else (paths[1], paths[0])
        pairs.append(Pair(a, b, "a" if a == paths[0] else "b", "human", group=str(i)))
        truth[(a, b)] = pairs[-1].preferred
    human = pairs[:24]
    candidates = [Pair(p.image_a, p.image_b, None, "auto", "blur", p.group) for p in pairs[24:]]
    return human, candidates, truth


def test_svm_learns_the_human_rule_and_reports_held_out_agreement(blur_pairs) -> None:
    human, candidates, truth = blur_pairs
    labelled, report = auto_annotate(human, candidates, SvmConfig(min_confidence=0.5, holdout=0.25))
    assert report.human_pairs == 24 and report.train_pairs + report.holdout_pairs == 24 and report.holdout_pairs >= 3
    assert report.holdout_agreement >= 0.75
    assert len(labelled) == len(candidates) == report.labelled
    correct = [p.preferred == truth[(p.image_a, p.image_b)] for p in labelled]
    assert np.mean(correct) >= 0.8, f"{np.mean(correct):.2f} of the SVM's labels agree with the hidden rule"
    assert all(p.source == "svm" and 0.5 <= p.confidence <= 1 and p.weight == p.confidence for p in labelled)
    swapped = [Pair(p.image_b, p.image_a, None, "auto", p.kind, p.group) for p in candidates]
    flipped, _ = auto_annotate(human, swapped, SvmConfig(min_confidence=0.5, holdout=0.25))
    assert [p.preferred for p in flipped] == [{"a": "b", "b": "a"}[p.preferred] for p in labelled], "swapping a and b flips the label"


def test_confidence_threshold_keeps_only_sure_labels(blur_pairs) -> None:
    human, candidates, _ = blur_pairs
    sure, report = auto_annotate(human, candidates, SvmConfig(min_confidence=0.97, holdout=0.25))
    assert len(sure) < len(candidates) and report.dropped_low_confidence == len(candidates) - len(sure)
    assert all(p.confidence >= 0.97 for p in sure)


def test_kernel_and_scaling_are_configurable() -> None:
    steps = [name for name, _ in make_svm(SvmConfig(kernel="linear", scaling="minmax"), 10).steps]
    assert steps == ["minmaxscaler", "calibratedclassifiercv"]
    assert make_svm(SvmConfig(kernel="poly", scaling="none"), 10).steps[-1][1].estimator.kernel == "poly"
    with pytest.raises(ValueError, match="kernel must be one of rbf, linear, poly, sigmoid"):
        SvmConfig(kernel="cubic")
    with pytest.raises(ValueError, match="at least 6 human pairs"):
        auto_annotate([], [], SvmConfig())


def test_frm_annotate_command(blur_pairs, tmp_path: Path) -> None:
    human, candidates, _ = blur_pairs
    write_pairs(tmp_path / "human.jsonl", human)
    write_pairs(tmp_path / "cands.jsonl", candidates + [Pair(tmp_path / "gone.png", human[0].image_a)])
    (tmp_path / "gone.png").write_bytes(b"")
    out = tmp_path / "svm.jsonl"
    args = ["frm-annotate", "--human", str(tmp_path / "human.jsonl"), "--candidates", str(tmp_path / "cands.jsonl"), "-o", str(out)]
    res = CliRunner().invoke(
        main, [*args, "--kernel", "linear", "--scaling", "minmax", "--min-confidence", "0.6", "--json", str(tmp_path / "r.json")]
    )
    assert res.exit_code == 1 and "gone.png:" in res.stderr, res.output  # the empty image is reported, the rest labelled
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["kernel"] == "linear" and report["config"]["scaling"] == "minmax"
    assert "held-out agreement" in res.stderr and report["labelled"] == len(read_pairs(out)) > 0
