"""The Face Reward Model: config, save/load round trip, upstream (open_clip / HPSv2 layout) files, `score`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import face_like, fine_tuning_assets

from facerestore_cli.cli import main
from facerestore_cli.rewards.backbones import BackboneError
from facerestore_cli.rewards.frm import CLIP_MEAN, CLIP_STD, FaceRewardModel, FrmConfig, load_frm

TINY = dict(image_size=32, channels=[8, 16], embed_dim=16)
#: A tiny open_clip CLIP with the ViT-H-14 / HPSv2 layout (same key names, small sizes).
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_save_pretrained_round_trip_gives_the_same_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaceRewardModel(FrmConfig(**TINY)).eval()
    faces = [face_like(48, i) for i in range(3)]
    before = model.score_images(faces)
    model.save_pretrained(tmp_path / "frm")
    assert sorted(p.name for p in (tmp_path / "frm").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "frm" / "config.json").read_text())
    assert config["model_type"] == "facerestore-frm" and config["channels"] == [8, 16]
    loaded = FaceRewardModel.from_pretrained(tmp_path / "frm")
    assert loaded.score_images(faces) == pytest.approx(before, abs=1e-6)
    assert len(set(np.round(before, 6))) == 3, "different faces get different scores"
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "frm" / "model.safetensors").stat().st_size
    assert FaceRewardModel.from_pretrained(tmp_path / "half").score_images(faces) == pytest.approx(before, abs=5e-3)


def test_bad_folders_and_configs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="unknown FRM config keys: chanels"):
        FrmConfig.from_dict({"chanels": [8, 16]})
    with pytest.raises(BackboneError, match="not an FRM folder"):
        FaceRewardModel.from_pretrained(tmp_path)
    FaceRewardModel(FrmConfig(**TINY)).save_pretrained(tmp_path / "frm")
    cfg = json.loads((tmp_path / "frm" / "config.json").read_text())
    cfg["channels"] = [8, 24]
    (tmp_path / "frm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackboneError, match="does not fit config.json"):
        FaceRewardModel.from_pretrained(tmp_path / "frm")


def test_scores_are_differentiable_in_the_image() -> None:
    """A restorer is later trained through the score: gradients must reach the pixels."""
    model = FaceRewardModel(FrmConfig(**TINY)).eval()
    x = torch.rand(2, 3, 64, 64, requires_grad=True)  # any size: resized inside
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hashed_captions_condition_the_score() -> None:
    torch.manual_seed(0)
    model = FaceRewardModel(FrmConfig(**TINY, text="hash")).eval()
    face = [face_like(32, 1)]
    s1, s2 = model.score_images(face, ["a sharp photo"]), model.score_images(face, ["a blurry photo"])
    assert s1 != pytest.approx(s2, abs=1e-6)
    plain = FaceRewardModel(FrmConfig(**TINY)).eval()
    assert plain.score_images(face, ["a sharp photo"]) == plain.score_images(face, ["anything else"])


# ------------------------------------------------------------------ upstream open_clip layout
@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> tuple[Path, "torch.nn.Module"]:
    """A tiny random open_clip model saved as HPSv2 / FaceRewardModel.pth do: {'state_dict': ...}."""
    pytest.importorskip("open_clip", reason='open_clip_torch not installed (pip install -e ".[clip]")')
    from open_clip.model import CLIP

    torch.manual_seed(0)
    clip = CLIP(embed_dim=TINY_CLIP["embed_dim"], vision_cfg=TINY_CLIP["vision_cfg"], text_cfg=TINY_CLIP["text_cfg"]).eval()
    path = tmp_path_factory.mktemp("upstream") / "FaceRewardModel.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}, "epoch": 3}, path)
    return path, clip


def test_upstream_checkpoint_scores_like_hpsv2(upstream) -> None:
    """score = diag(normalised image features @ normalised text features), on CLIP-normalised 224-style input."""
    import open_clip

    path, clip = upstream
    frm = load_frm(path, clip=TINY_CLIP)
    assert frm.config.backbone == "open_clip" and frm.config.image_size == 32
    faces = [face_like(32, i) for i in range(2)]
    caption = "a photo of a face, high quality"
    ours = frm.score_images(faces, [caption] * 2)
    x = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(clip.encode_text(open_clip.tokenize([caption] * 2)), dim=-1)
    assert ours == pytest.approx(torch.diagonal(img @ txt.T).tolist(), abs=1e-5)


def test_upstream_round_trip_and_mismatch(upstream, tmp_path: Path) -> None:
    path, _ = upstream
    frm = load_frm(path, clip=TINY_CLIP)
    frm.save_pretrained(tmp_path / "converted")
    again = FaceRewardModel.from_pretrained(tmp_path / "converted")
    faces = [face_like(32, 5)]
    assert again.score_images(faces) == pytest.approx(frm.score_images(faces), abs=1e-6)
    wrong = json.loads(json.dumps(TINY_CLIP))
    wrong["vision_cfg"]["layers"] = 3
    with pytest.raises(BackboneError, match=r"does not fit the open_clip config: .*missing .*visual\.transformer\.resblocks\.2"):
        load_frm(path, clip=wrong)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a readable torch checkpoint"):
        load_frm(tmp_path / "junk.pth", clip=TINY_CLIP)


def test_score_command_takes_an_upstream_checkpoint(upstream, tmp_path: Path) -> None:
    path, _ = upstream
    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    cv2.imwrite(str(tmp_path / "face.png"), face_like(32, 0))
    res = CliRunner().invoke(
        main, ["score", str(tmp_path / "face.png"), "--model", str(path), "--clip", str(tmp_path / "clip.json"), "--caption", "a face"]
    )
    assert res.exit_code == 0, res.output
    score, name = res.stdout.strip().split("\t")
    assert -1 <= float(score) <= 1 and name.endswith("face.png")


# ------------------------------------------------------------------ facerestore score
@pytest.fixture()
def tiny_frm(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return FaceRewardModel(FrmConfig(**TINY)).save_pretrained(tmp_path / "frm")


def test_score_prints_one_line_per_file_and_reports_bad_files(tiny_frm: Path, tmp_path: Path) -> None:
    good = [tmp_path / "a.png", tmp_path / "b.jpg"]
    cv2.imwrite(str(good[0]), face_like(64, 0))
    cv2.imwrite(str(good[1]), face_like(64, 1))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    res = CliRunner().invoke(
        main,
        [
            "score",
            *map(str, good),
            str(tmp_path / "broken.png"),
            str(tmp_path / "missing.png"),
            "--model",
            str(tiny_frm),
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert res.exit_code == 1
    lines = res.stdout.strip().splitlines()
    assert [Path(line.split("\t")[1]).name for line in lines] == ["a.png", "b.jpg"]
    expected = FaceRewardModel.from_pretrained(tiny_frm).score_images([cv2.imread(str(p))[:, :, ::-1].copy() for p in good])
    assert [float(line.split("\t")[0]) for line in lines] == pytest.approx(expected, abs=1e-4)
    assert "broken.png:" in res.stderr and "missing.png: no such file" in res.stderr
    assert len(json.loads((tmp_path / "s.json").read_text())["errors"]) == 2
    ordered = CliRunner().invoke(main, ["score", *map(str, good), "--model", str(tiny_frm), "--sort"])
    scores = [float(line.split("\t")[0]) for line in ordered.stdout.strip().splitlines()]
    assert ordered.exit_code == 0 and scores == sorted(scores, reverse=True) and "best:" in ordered.stderr


def test_score_warns_once_per_input_that_is_not_an_aligned_crop(tiny_frm: Path, tmp_path: Path) -> None:
    """Without --detect a whole photo still gets a number, but not silently: a non-square input,
    or a square one whose face is not where an aligned crop has it, gets one warning line."""
    from facerestore_cli.faces.detector import build_detector
    from facerestore_cli.rewards.scoring import aligned_faces

    photo = cv2.imread(str(Path(__file__).resolve().parents[1] / "examples" / "astronaut_lq.jpg"))  # square, face off-template
    cv2.imwrite(str(tmp_path / "photo.png"), photo)
    cv2.imwrite(str(tmp_path / "wide.png"), photo[:, :400])
    crop = aligned_faces(photo[:, :, ::-1].copy(), build_detector("mtcnn"))[0]
    cv2.imwrite(str(tmp_path / "crop.png"), crop[:, :, ::-1])
    names = ["photo.png", "wide.png", "crop.png"]
    res = CliRunner().invoke(
        main, ["score", *[str(tmp_path / n) for n in names], "--model", str(tiny_frm), "--json", str(tmp_path / "s.json")]
    )
    assert res.exit_code == 0, res.output
    assert [Path(line.split("\t")[1]).name for line in res.stdout.strip().splitlines()] == names, "every input is still scored"
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, res.stderr
    assert (
        warnings[0]
        == f"warning: {tmp_path / 'photo.png'}: its face is not where an aligned face crop has it; its score is not a face's (--detect scores the faces in a photo)"
    )
    assert warnings[1].startswith(f"warning: {tmp_path / 'wide.png'}: 400x512 pixels, not a square aligned face crop;")
    rows = json.loads((tmp_path / "s.json").read_text())["scores"]
    assert [r["warning"] is None for r in rows] == [False, False, True]
    trusted = CliRunner().invoke(main, ["score", *[str(tmp_path / n) for n in names], "--model", str(tiny_frm), "--aligned-ok"])
    assert [line for line in trusted.stderr.splitlines() if line.startswith("warning:")] == [warnings[1]], "the shape is always checked"
    detected = CliRunner().invoke(main, ["score", str(tmp_path / "photo.png"), "--model", str(tiny_frm), "--detect"])
    assert detected.exit_code == 0 and "warning:" not in detected.stderr


def test_score_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["score", "x.png", "--model", str(tmp_path)])
    assert res.exit_code == 2 and "not an FRM folder" in res.stderr


def test_frm_is_a_no_reference_metric_of_the_registry(tiny_frm: Path, tmp_path: Path, monkeypatch) -> None:
    import facerestore_cli.rewards.metrics as frm_metric
    from facerestore_cli.metrics import MetricUnavailable, create_metric, metric_info

    monkeypatch.setattr(frm_metric, "FRM_WEIGHTS", tmp_path / "none")
    assert "FRM weights missing" in metric_info("frm").unavailable_reason
    with pytest.raises(MetricUnavailable, match="frm"):
        create_metric("frm")
    monkeypatch.setattr(frm_metric, "FRM_WEIGHTS", tiny_frm)
    info = metric_info("frm")
    assert info.available and info.kind == "NR" and not info.lower_better
    metric = create_metric("frm")
    faces = [face_like(64, 0), face_like(64, 1)]
    assert metric.score_batch(faces) == pytest.approx(FaceRewardModel.from_pretrained(tiny_frm).score_images(faces), abs=1e-6)
    assert metric(faces[0]) == pytest.approx(metric.score_batch(faces)[0], abs=1e-6)


def test_without_open_clip_an_upstream_file_says_what_to_install(upstream, monkeypatch) -> None:
    import sys

    path, _ = upstream
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if open_clip_torch were not installed
    with pytest.raises(BackboneError, match=r'open_clip_torch package \(pip install -e "\.\[clip\]"\)'):
        load_frm(path, clip="ViT-H-14")


def test_score_takes_a_reward_model_file_and_refuses_a_restorer_one(tmp_path: Path) -> None:
    """`--model` names the FRM as every command names models: a `frm` model file (or its store
    name) works like its folder; a restorer's model file is one line, not a traceback."""
    frm = fine_tuning_assets(tmp_path)["frm"]
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), face_like(64, 1))
    (tmp_path / "frm.toml").write_text(f'kind = "frm"\nfrm = "{frm}"\n')
    by_file = CliRunner().invoke(main, ["score", str(face), "--model", str(tmp_path / "frm.toml"), "--device", "cpu"])
    by_folder = CliRunner().invoke(main, ["score", str(face), "--model", str(frm), "--device", "cpu"])
    assert by_file.exit_code == 0 and by_file.stdout == by_folder.stdout, by_file.output
    (tmp_path / "osediff.toml").write_text(f'kind = "osediff"\nsd = "{frm}"\nosediff = "{face}"\n')
    wrong = CliRunner().invoke(main, ["score", str(face), "--model", str(tmp_path / "osediff.toml"), "--device", "cpu"])
    assert wrong.exit_code == 2 and "is not a Face Reward Model (it is a osediff model file)" in wrong.output
