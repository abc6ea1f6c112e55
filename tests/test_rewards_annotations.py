"""Human labels (import and validation), automatic pairs and the graded degradations behind them."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import face_like

from facerestore_cli.cli import main
from facerestore_cli.data.annotations import AnnotationError, load_annotations, read_pairs
from facerestore_cli.data.autopairs import degrade_at, graded_params
from facerestore_cli.data.degrade import DegradationConfig, apply_degradation, sample_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def faces(tmp_path: Path) -> Path:
    root = tmp_path / "labels"
    (root / "img").mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(root / "img" / f"{i}.png"), face_like(32, i))
    return root


# ------------------------------------------------------------------ human labels
def test_pairwise_csv_keeps_good_rows_and_names_each_bad_one(faces: Path, tmp_path: Path) -> None:
    (faces / "human.csv").write_text(
        "image_a,image_b,preferred,annotator\n"
        "img/0.png,img/1.png,a,ann\n"
        "img/1.png,img/2.png,B,ann\n"
        "img/2.png,img/3.png,tie,ann\n"
        "img/0.png,img/3.png,img/3.png,ann\n"  # the preferred image by path
        "img/0.png,img/9.png,a,ann\n"
        "img/0.png,img/1.png,maybe,ann\n"
        "img/0.png,img/0.png,a,ann\n"
        "img/0.png,,a,ann\n"
        "img/0.png,notes.txt,a,ann\n"
        "img/0.png,img/1.png,a,ann,extra\n"
    )
    result = load_annotations(faces / "human.csv")
    assert [p.preferred for p in result.pairs] == ["a", "b", "tie", "b"]
    assert [p.target for p in result.pairs] == [1.0, 0.0, 0.5, 0.0]
    assert all(p.source == "human" and p.annotator == "ann" and p.image_a.is_file() for p in result.pairs)
    reasons = [str(e) for e in result.errors]
    assert reasons == [
        f"{faces / 'human.csv'}:6: image_b 'img/9.png' not found",
        f"{faces / 'human.csv'}:7: preferred must be a, b or tie (or one of the two image paths), got 'maybe'",
        f"{faces / 'human.csv'}:8: image_a and image_b are the same file",
        f"{faces / 'human.csv'}:9: missing image_b",
        f"{faces / 'human.csv'}:10: image_b 'notes.txt' is not an image file (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp)",
        f"{faces / 'human.csv'}:11: 1 more value(s) than header columns",
    ]

    out = tmp_path / "elsewhere" / "pairs.jsonl"
    res = CliRunner().invoke(main, ["frm-import", str(faces / "human.csv"), "-o", str(out)])
    assert res.exit_code == 1, "bad rows make the exit code non-zero"
    assert res.stderr.count("(row skipped)") == 6 and "human.csv:7: preferred must be" in res.stderr
    again = read_pairs(out)  # paths were rewritten relative to the new file
    assert [(p.image_a.resolve(), p.preferred) for p in again] == [(p.image_a.resolve(), p.preferred) for p in result.pairs]


def test_jsonl_labels_with_bad_lines(faces: Path) -> None:
    rows = [
        {"image_a": "img/0.png", "image_b": "img/1.png", "preferred": "a", "caption": "a man", "weight": 2},
        "not json",
        {"image_a": "img/0.png", "image_b": "img/1.png", "preferred": "a", "weight": -1},
        {"image_a": "img/2.png", "image_b": "img/3.png", "preferred": "b", "source": "robot"},
        [1, 2],
    ]
    (faces / "h.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    result = load_annotations(faces / "h.jsonl")
    assert len(result.pairs) == 1 and result.pairs[0].caption == "a man" and result.pairs[0].weight == 2
    assert [e.line for e in result.errors] == [2, 3, 4, 5]
    assert "not valid JSON" in result.errors[0].reason and "weight -1 must be at least 0" in result.errors[1].reason
    assert "source must be one of human, auto, svm" in result.errors[2].reason and result.errors[3].reason == "not a JSON object"


def test_ratings_become_pairs_within_groups(faces: Path) -> None:
    (faces / "ratings.csv").write_text(
        "image,rating,group\n"
        "img/0.png,4,g1\nimg/0.png,5,g1\n"  # mean 4.5
        "img/1.png,2,g1\n"
        "img/2.png,3,g2\nimg/3.png,3,g2\n"  # equal: no pair
        "img/3.png,lots,g2\n"
    )
    result = load_annotations(faces / "ratings.csv")
    assert result.kind == "ratings"
    assert [(p.image_a.name, p.image_b.name, p.preferred, p.kind) for p in result.pairs] == [("0.png", "1.png", "a", "rating")]
    assert len(result.errors) == 1 and result.errors[0].line == 7 and "rating 'lots' is not a number" in result.errors[0].reason
    gap = load_annotations(faces / "ratings.csv", min_rating_gap=3)
    assert gap.pairs == []


def test_unusable_files_are_one_line_errors(faces: Path, tmp_path: Path) -> None:
    (faces / "x.csv").write_text("left,right\na.png,b.png\n")
    with pytest.raises(
        AnnotationError, match=r"x\.csv: columns left, right are neither pairwise preferences \(image_a, image_b, preferred\) nor ratings"
    ):
        load_annotations(faces / "x.csv")
    (faces / "x.txt").write_text("")
    with pytest.raises(AnnotationError, match="unknown annotation format '.txt'"):
        load_annotations(faces / "x.txt")
    res = CliRunner().invoke(main, ["frm-import", str(faces / "x.csv"), "-o", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "are neither pairwise" in res.stderr


# ------------------------------------------------------------------ graded degradations
def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milder_levels_are_closer_to_the_ground_truth(seed: int) -> None:
    hq = torch.from_numpy(face_like(128, seed)).permute(2, 0, 1)[None].float() / 255
    cfg = DegradationConfig(blur_sigma=(0.1, 8), downsample=(1, 8), noise_sigma=(0, 15), jpeg_quality=(40, 100))
    p = sample_params(cfg, 1, torch.Generator().manual_seed(seed))
    levels = graded_params(p, [0.25, 0.5, 1.0], cfg)
    assert torch.all(levels.sigma_x.diff() >= 0) and torch.all(levels.scale.diff() >= 0) and torch.all(levels.quality.diff() <= 0)
    out = degrade_at(hq.expand(3, -1, -1, -1), levels, 41, torch.Generator().manual_seed(seed))
    psnrs = [_psnr(out[i], hq[0]) for i in range(3)]
    assert psnrs[0] > psnrs[1] > psnrs[2], psnrs


def test_degradation_at_512_is_the_training_degradation() -> None:
    """Pairs for the restorer subset are degraded exactly as the restorer's test sets are."""
    hq = torch.rand(1, 3, 64, 64)
    hq = torch.nn.functional.interpolate(hq, size=(512, 512), mode="bilinear", align_corners=False)
    p = sample_params(DegradationConfig(), 1, torch.Generator().manual_seed(5))
    ours = degrade_at(hq, p, 41, torch.Generator().manual_seed(9))
    theirs = apply_degradation(hq, p, 41, torch.Generator().manual_seed(9))
    assert torch.allclose(ours, theirs, atol=2e-3)


# ------------------------------------------------------------------ automatic pairs
def test_frm_pairs_writes_rule_labelled_pairs_and_candidates(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        cv2.imwrite(str(src / f"f{i}.png"), face_like(96, i))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")  # sorted first, and chosen for restoring
    out = tmp_path / "pairs"
    args = [
        "frm-pairs",
        str(src),
        "-o",
        str(out),
        "--size",
        "32",
        "--work-size",
        "64",
        "--levels",
        "0.5,1",
        "--restore-limit",
        "1",
        "--device",
        "cpu",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "broken.png: unreadable image, skipped" in res.stderr, res.output
    pairs = read_pairs(out / "pairs.jsonl")
    kinds = [p.kind for p in pairs]
    assert kinds.count("gt>degraded") == 4 * 2 and kinds.count("milder>stronger") == 4
    restored = [p for p in pairs if p.kind == "gt>restored"]
    assert len(restored) == 1 and restored[0].group == "f0", "the unreadable first face's restoration moves to the next face"
    assert kinds.count("restored>degraded") == 1
    assert all(p.preferred == "a" and p.source == "auto" for p in pairs)
    for p in pairs:
        assert cv2.imread(str(p.image_a)).shape == (32, 32, 3) and p.group == p.image_a.stem
        if p.kind == "milder>stronger":
            assert "degraded_0.5" in str(p.image_a) and "degraded_1" in str(p.image_b)
    cands = read_pairs(out / "candidates.jsonl", require_label=False)
    assert {c.kind for c in cands} == {"level-vs-alternative", "restored-vs-mild"} and all(c.preferred is None for c in cands)
    settings = json.loads((out / "autopairs.json").read_text())
    assert settings["levels"] == [0.5, 1.0] and settings["pairs"] == len(pairs)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already holds pairs.jsonl" in again.stderr


def test_an_interrupted_frm_pairs_run_resumes_to_the_same_set(tmp_path: Path) -> None:
    from facerestore_cli.data.autopairs import AutoPairsConfig, make_auto_pairs
    from facerestore_cli.data.testsets import EvalInputError

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        cv2.imwrite(str(src / f"f{i}.png"), face_like(64, i))
    cfg = AutoPairsConfig(size=32, work_size=64, levels=[0.5, 1.0], seed=4)
    fresh = make_auto_pairs(src, tmp_path / "fresh", cfg)

    seen = []

    def stop_after_three(name: str) -> None:  # 3 faces written (the last made again on resume)
        seen.append(name)
        if len(seen) == 4:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        make_auto_pairs(
            src, cut, AutoPairsConfig(size=32, work_size=64, levels=[0.5, 1.0], seed=4, write_every=1), on_face=stop_after_three
        )
    assert not (cut / "pairs.jsonl").exists() and (cut / "pairs.partial.jsonl").is_file()
    with pytest.raises(EvalInputError, match="interrupted run used other settings \\(seed\\)"):
        make_auto_pairs(src, cut, AutoPairsConfig(size=32, work_size=64, levels=[0.5, 1.0], seed=5))
    with pytest.raises(EvalInputError, match="holds an interrupted run"):
        make_auto_pairs(src, cut, cfg, resume=False)
    resumed = make_auto_pairs(src, cut, cfg)
    assert resumed.pairs == fresh.pairs == 5 * 3 and resumed.faces == 5
    rows = lambda d: sorted((d / "pairs.jsonl").read_text().splitlines())  # noqa: E731
    assert rows(cut) == rows(tmp_path / "fresh")
    for p in read_pairs(cut / "pairs.jsonl"):
        assert np.array_equal(cv2.imread(str(p.image_b)), cv2.imread(str(tmp_path / "fresh" / p.image_b.relative_to(cut))))
