"""`train-frm`: Bradley-Terry training, validation accuracy, checkpoints, resume; `frm-eval`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import TINY_FRM, face_like, run_torchrun

from facerestore_cli.cli import main
from facerestore_cli.data.annotations import Pair, load_pair_files, split_pairs, write_pairs
from facerestore_cli.rewards.frm import FaceRewardModel
from facerestore_cli.train.frm import FrmTrainConfig, evaluate_pairs, train_frm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_vs_blurred(tmp_path_factory) -> Path:
    """Pairs where the sharp face is better; a is the better one only half the time."""
    root = tmp_path_factory.mktemp("frmdata")
    pairs = []
    for i in range(48):
        face = face_like(64, i)
        cv2.imwrite(str(root / f"{i}_sharp.png"), face)
        cv2.imwrite(str(root / f"{i}_blur.png"), cv2.GaussianBlur(face, (0, 0), 1.6))
        sharp, blur = root / f"{i}_sharp.png", root / f"{i}_blur.png"
        pairs.append(
            Pair(sharp, blur, "a", "auto", "sharp>blurred", str(i)) if i % 2 else Pair(blur, sharp, "b", "auto", "sharp>blurred", str(i))
        )
    return write_pairs(root / "pairs.jsonl", pairs)


def write_config(path: Path, pairs: Path, steps: int = 60, **extra) -> Path:
    top = {
        "pairs": [str(pairs)],
        "steps": steps,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 5,
        "val_fraction": 0.25,
        "val_every": 30,
        "checkpoint_every": 10,
        "log_every": 5,
        **extra,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    lines += ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in TINY_FRM.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_frm_learns_a_preference_and_reports_validation_accuracy(sharp_vs_blurred: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "frm.toml", sharp_vs_blurred)
    res = CliRunner().invoke(main, ["train-frm", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "step 30: validation pairwise accuracy" in res.stderr and "train-frm summary" in res.stderr and "final model:" in res.stderr
    model = FaceRewardModel.from_pretrained(tmp_path / "run" / "final")
    pairs, _ = load_pair_files([sharp_vs_blurred])
    _, val = split_pairs(pairs, 0.25, 0)
    result = evaluate_pairs(model, val)
    assert len(val) >= 6 and result.accuracy >= 0.9, f"held-out accuracy {result.accuracy:.2f} on {len(val)} pairs"
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [30, 60] and rows[-1]["val_accuracy"] == pytest.approx(
        result.accuracy, abs=1e-4
    )


def test_train_frm_stops_on_time_and_resumes(sharp_vs_blurred: Path, tmp_path: Path) -> None:
    cfg = FrmTrainConfig.from_file(write_config(tmp_path / "frm.toml", sharp_vs_blurred, steps=20))
    stopped = train_frm(cfg, tmp_path / "run", max_minutes=1e-6)
    # a 60 us budget: one step, or none when the machine is busy before the budget is first read
    assert not stopped.finished and stopped.step in (0, 1) and not (tmp_path / "run" / "final").exists()
    res = CliRunner().invoke(
        main, ["train-frm", "--config", str(tmp_path / "frm.toml"), "--out", str(tmp_path / "run"), "--steps", "20", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    # the summary's rows (table borders vary with the terminal): the steps made now, ending at 20 of 20
    made = 20 - stopped.step
    assert re.search(rf"\bsteps this run\W+{made}\W", res.stderr) and re.search(r"\bstep\W+20 / 20\W", res.stderr), res.stderr
    state = torch.load(tmp_path / "run" / "checkpoint" / "training_state.pt", weights_only=False)
    assert state["step"] == 20 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    more = train_frm(FrmTrainConfig.from_dict({**cfg.to_dict(), "steps": 25}), tmp_path / "run")
    assert more.finished and more.step == 25 and more.steps_this_run == 5, "must resume, not restart"
    fresh = train_frm(FrmTrainConfig.from_dict({**cfg.to_dict(), "steps": 3}), tmp_path / "run", resume=False)
    assert fresh.steps_this_run == 3


def test_bad_rows_and_unreadable_images_are_reported_and_training_goes_on(sharp_vs_blurred: Path, tmp_path: Path) -> None:
    lines = sharp_vs_blurred.read_text().splitlines()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n nope")
    good = json.loads(lines[0])
    bad_file = tmp_path / "pairs.jsonl"
    rows = [
        {
            **json.loads(line),
            "image_a": str(sharp_vs_blurred.parent / json.loads(line)["image_a"]),
            "image_b": str(sharp_vs_blurred.parent / json.loads(line)["image_b"]),
        }
        for line in lines
    ]
    rows.insert(3, {"image_a": str(broken), "image_b": str(sharp_vs_blurred.parent / good["image_b"]), "preferred": "b", "group": "broken"})
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"image_a": "nowhere.png", "image_b": "x.png", "preferred": "a"}\n'
    bad_file.write_text(text)
    cfg = write_config(tmp_path / "frm.toml", bad_file, steps=12, val_fraction=0.0)
    res = CliRunner().invoke(main, ["train-frm", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 1 and (tmp_path / "run" / "final").is_dir(), res.output
    assert f"{bad_file}:{len(rows) + 1}: image_a 'nowhere.png' not found (row skipped)" in res.stderr
    assert "broken.png:" in res.stderr and "(pair skipped)" in res.stderr


def test_bad_config_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('pairs = ["p.jsonl"]\nstep = 10\n')
    res = CliRunner().invoke(main, ["train-frm", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "unknown train-frm config keys: step" in res.stderr


def test_captions_condition_what_is_preferred(tmp_path: Path) -> None:
    """The same two faces, opposite preferences under two captions: only caption conditioning can learn it."""
    pairs = []
    for i in range(32):
        face = face_like(32, i).astype(np.int16)
        bright, dark = tmp_path / f"{i}_bright.png", tmp_path / f"{i}_dark.png"
        cv2.imwrite(str(bright), np.clip(face + 50, 0, 255).astype(np.uint8))
        cv2.imwrite(str(dark), np.clip(face - 50, 0, 255).astype(np.uint8))
        pairs += [
            Pair(bright, dark, "a", "human", "", str(i), "a bright photo"),
            Pair(bright, dark, "b", "human", "", str(i), "a dark photo"),
        ]
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    cfg = FrmTrainConfig.from_dict(
        {
            "pairs": [str(tmp_path / "pairs.jsonl")],
            "steps": 80,
            "batch_size": 16,
            "lr": 5e-3,
            "warmup_steps": 5,
            "val_fraction": 0.0,
            "model": {**TINY_FRM, "text": "hash"},
        }
    )
    train_frm(cfg, tmp_path / "run")
    model = FaceRewardModel.from_pretrained(tmp_path / "run" / "final")
    assert evaluate_pairs(model, pairs).accuracy >= 0.9


def test_fine_tunes_an_upstream_open_clip_frm_with_locked_towers(tmp_path: Path, sharp_vs_blurred: Path) -> None:
    pytest.importorskip("open_clip", reason='open_clip_torch not installed (pip install -e ".[clip]")')
    from open_clip.model import CLIP

    clip_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    torch.manual_seed(0)
    clip = CLIP(embed_dim=16, vision_cfg=clip_cfg["vision_cfg"], text_cfg=clip_cfg["text_cfg"])
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "FaceRewardModel.pth")
    cfg = FrmTrainConfig.from_dict(
        {
            "pairs": [str(sharp_vs_blurred)],
            "init": str(tmp_path / "FaceRewardModel.pth"),
            "clip": clip_cfg,
            "steps": 3,
            "batch_size": 4,
            "unlocked_image_groups": 1,
            "unlocked_text_layers": 0,
            "val_fraction": 0.0,
        }
    )
    result = train_frm(cfg, tmp_path / "run")
    assert result.finished
    tuned = FaceRewardModel.from_pretrained(tmp_path / "run" / "final")
    assert tuned.config.backbone == "open_clip" and tuned.config.clip["vision_cfg"]["layers"] == 2
    before, after = clip.state_dict(), tuned.backbone.clip.state_dict()
    assert torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"]), "locked image groups stay as they were"
    assert torch.equal(before["token_embedding.weight"], after["token_embedding.weight"]), "the locked text tower stays as it was"
    assert not torch.equal(before["visual.proj"], after["visual.proj"]), "the unlocked last image group is trained"


def test_frm_eval_reports_accuracy_by_kind_and_the_full_ranking(tmp_path: Path) -> None:
    pairs = []
    for i in range(6):
        face = face_like(64, i)
        gt, restored, degraded = (tmp_path / f"{i}_{n}.png" for n in ("gt", "restored", "degraded"))
        cv2.imwrite(str(gt), face)
        cv2.imwrite(str(restored), cv2.GaussianBlur(face, (0, 0), 1.0))
        cv2.imwrite(str(degraded), cv2.GaussianBlur(face, (0, 0), 3.0))
        pairs += [
            Pair(gt, restored, "a", "auto", "gt>restored", str(i)),
            Pair(restored, degraded, "a", "auto", "restored>degraded", str(i)),
        ]
    write_pairs(tmp_path / "val.jsonl", pairs)
    torch.manual_seed(0)
    model = FaceRewardModel.from_pretrained(
        FaceRewardModel(__import__("facerestore_cli.rewards.frm", fromlist=["FrmConfig"]).FrmConfig(**TINY_FRM)).save_pretrained(
            tmp_path / "frm"
        )
    )
    expected = evaluate_pairs(model, pairs)
    res = CliRunner().invoke(
        main, ["frm-eval", str(tmp_path / "val.jsonl"), "--model", str(tmp_path / "frm"), "--json", str(tmp_path / "e.json")]
    )
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["pairs"] == 12 and out["ranking_faces"] == 6 and out["accuracy"] == pytest.approx(expected.accuracy)
    assert set(out["by_kind"]) == {"gt>restored", "restored>degraded"} and set(out["mean_scores"]) == {
        "ground truth",
        "restored",
        "degraded (full strength)",
    }
    assert "ground truth > restored > degraded on" in res.stderr


def test_kind_sampling_draws_rare_kinds_more_often(sharp_vs_blurred: Path) -> None:
    from facerestore_cli.train.frm import PairDataset, _batches

    pairs, _ = load_pair_files([sharp_vs_blurred])
    pairs[0].kind = "gt>restored"
    data = PairDataset(pairs, 16, flip=False)
    cfg = FrmTrainConfig.from_dict({"pairs": ["x"], "batch_size": 16, "kind_sampling": {"gt>restored": 40.0}})
    batches = _batches(data, cfg, 0)
    rare = pairs[0].image_a
    drawn = [next(batches) for _ in range(4)]  # 64 pairs
    hits = sum(int(torch.equal(a, data[0][0])) for batch in drawn for a in batch[0])
    assert hits >= 15, f"the rare pair ({rare.name}) was drawn {hits} times of 64"
    with pytest.raises(ValueError, match="kind_sampling weights must be positive"):
        FrmTrainConfig.from_dict({"kind_sampling": {"x": 0}})


def test_two_process_frm_training_through_torchrun(sharp_vs_blurred: Path, tmp_path: Path) -> None:
    """train-frm runs under torchrun like the other training commands: each process trains on its
    rows of the same batches with gradients averaged, so both make the same steps; only the main
    process logs, reports and saves (2 CPU processes, gloo)."""
    cfg = FrmTrainConfig.from_file(write_config(tmp_path / "frm.toml", sharp_vs_blurred, steps=10, val_every=10))
    printed, rows = run_torchrun("train-frm", cfg, tmp_path / "run")
    assert printed.count("train-frm summary") == 1, "only the main process reports"
    assert [r["step"] for r in rows if "loss" in r] == [5, 10] and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "val_accuracy" in r] == [10]
    assert FaceRewardModel.from_pretrained(tmp_path / "run" / "final").config.image_size == TINY_FRM["image_size"]
