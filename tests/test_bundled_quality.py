"""The bundled models judged as a user would judge them: on held-out faces, made into a test set
the way the README makes one (`prepare-data`, then `degrade --seed 123 --config
configs/train_tiny.toml`), `weights/restorer-tiny` must beat the degraded input and the classical
baseline (bicubic + unsharp mask, `facerestore eval`'s) on PSNR, and `weights/frm-tiny` must rank
each clean face above its degraded copy. Its output on one fixed degraded input is pinned, as
diffusers pins its pipelines, so a change of weights, architecture or numerics is seen.

The held-out faces are the first 8 of ../shared/data/faces/val/celeba128 (skipped, with the
reason, where that folder is absent); the pinned output needs no data.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import face_like

from facerestore_cli.cli import main
from facerestore_cli.data.degrade import DegradationConfig, Degrader
from facerestore_cli.evaluate import evaluate
from facerestore_cli.io.images import read_image
from facerestore_cli.io.tensors import to_images, to_tensor01
from facerestore_cli.models.inference import restore_crops
from facerestore_cli.models.loading import load_restorer
from facerestore_cli.paths import DEFAULT_FRM, DEFAULT_RESTORER
from facerestore_cli.rewards.frm import FaceRewardModel

pytestmark = [pytest.mark.usefixtures("two_threads"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VAL = "faces/val/celeba128"
FACES = 8

# Measured on the 8 faces (x86-64, torch 2.14.1): mean PSNR restorer-tiny 29.87 dB, degraded
# input 29.28 dB, bicubic + unsharp 29.14 dB; the restorer was ahead on every face. The margins
# are about half of those gaps (0.59 and 0.73 dB): far above what float rounding on another CPU
# moves, and lost by a restorer that does half as well.
OVER_INPUT_DB = 0.3
OVER_BASELINE_DB = 0.35
# FRM score (cosine, higher is better) of each clean face minus its degraded copy's, measured
# 0.62 to 1.72 (mean 1.30).
FRM_MARGIN = 0.3


@pytest.fixture(scope="module")
def held_out(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`prepare-data` on the first held-out photos, then `degrade` as the README makes its test set."""
    val = shared_data / VAL
    photos = sorted(val.glob("*.jpg"))[:FACES] if val.is_dir() else []
    if len(photos) < FACES:
        pytest.skip(f"held-out faces absent: {FACES} jpg files expected in {val}")
    root = tmp_path_factory.mktemp("held_out")
    (root / "photos").mkdir()
    for p in photos:
        shutil.copy(p, root / "photos" / p.name)
    prepared = CliRunner().invoke(main, ["prepare-data", str(root / "photos"), "-o", str(root / "faces"), "--device", "cpu"])
    assert prepared.exit_code == 0, prepared.output
    rows = [json.loads(line) for line in (root / "faces" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == FACES, "one face in each CelebA crop"
    assert all(read_image(root / "faces" / r["file"]).rgb.shape == (512, 512, 3) for r in rows), "aligned at 512 px"
    args = ["degrade", str(root / "faces"), "-o", str(root / "pairs"), "--seed", "123", "--config", str(ROOT / "configs/train_tiny.toml")]
    degraded = CliRunner().invoke(main, args)
    assert degraded.exit_code == 0, degraded.output
    return {"photos": root / "photos", "faces": root / "faces", "pairs": root / "pairs", "manifest": root / "faces" / "manifest.jsonl"}


def test_bundled_restorer_beats_the_input_and_the_classical_baseline(held_out: dict[str, Path]) -> None:
    result = evaluate(pairs=held_out["pairs"], models=[DEFAULT_RESTORER], metrics=["psnr"])
    psnr = {method: scores["psnr"] for method, scores in result.table.items()}
    said = ", ".join(f"{m} {v:.2f} dB" for m, v in psnr.items())
    assert result.counts["restorer-tiny"]["psnr"] == FACES, said
    assert psnr["restorer-tiny"] > psnr["input"] + OVER_INPUT_DB, f"the restorer must beat the degraded input: {said}"
    assert psnr["restorer-tiny"] > psnr["bicubic_unsharp"] + OVER_BASELINE_DB, f"the restorer must beat bicubic + unsharp: {said}"


def test_bundled_frm_ranks_each_clean_face_above_its_degraded_copy(held_out: dict[str, Path]) -> None:
    frm = FaceRewardModel.from_pretrained(DEFAULT_FRM).eval()
    names = sorted(p.name for p in (held_out["pairs"] / "hq").glob("*.png"))
    clean = frm.score_images([read_image(held_out["pairs"] / "hq" / n).rgb for n in names])
    degraded = frm.score_images([read_image(held_out["pairs"] / "lq" / n).rgb for n in names])
    gaps = [c - d for c, d in zip(clean, degraded)]
    assert len(gaps) == FACES and min(gaps) > FRM_MARGIN, f"clean minus degraded FRM scores: {np.round(gaps, 3).tolist()}"


def test_score_detect_scores_the_faces_prepare_data_aligns(held_out: dict[str, Path]) -> None:
    """`score --detect` on photos: one `score<TAB>file` line each, the bundled FRM's score of the
    face `prepare-data` aligned from it (the same detector and template)."""
    rows = [json.loads(line) for line in held_out["manifest"].read_text().splitlines()][:3]
    photos = [str(held_out["photos"] / Path(r["source"]).name) for r in rows]
    result = CliRunner().invoke(main, ["score", "--detect", *photos, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    parsed = [re.fullmatch(r"(-?\d+\.\d{4})\t(.+)", line) for line in lines]
    assert len(lines) == len(photos) and all(parsed), result.stdout
    assert [m.group(2) for m in parsed] == photos
    frm = FaceRewardModel.from_pretrained(DEFAULT_FRM).eval()
    want = frm.score_images([read_image(held_out["faces"] / r["file"]).rgb for r in rows])
    assert [float(m.group(1)) for m in parsed] == pytest.approx(want, abs=2e-3)


# ------------------------------------------------------------------ the pinned output
LOCATIONS = [(200, 200), (256, 256), (330, 300)]  # top-left corners of the 3x3x3 slices (y, x)
# model(x) of the degraded input below, mapped to [0, 1], measured on x86-64 (torch 2.14.1, fp32)
RAW = [
    [
        [[0.4289, 0.5046, 0.5145], [0.4666, 0.5289, 0.5585], [0.4981, 0.5683, 0.5979]],
        [[0.4401, 0.5026, 0.5109], [0.4812, 0.5333, 0.5577], [0.5124, 0.5705, 0.5963]],
        [[0.4446, 0.4944, 0.5052], [0.4874, 0.5290, 0.5539], [0.5192, 0.5660, 0.5902]],
    ],
    [
        [[0.5543, 0.5149, 0.5180], [0.5510, 0.5156, 0.5224], [0.5496, 0.5180, 0.5286]],
        [[0.5564, 0.5148, 0.5165], [0.5526, 0.5141, 0.5188], [0.5495, 0.5148, 0.5229]],
        [[0.5539, 0.5120, 0.5123], [0.5491, 0.5084, 0.5116], [0.5453, 0.5073, 0.5127]],
    ],
    [
        [[0.4508, 0.4745, 0.4904], [0.4544, 0.4721, 0.4876], [0.4572, 0.4701, 0.4805]],
        [[0.4409, 0.4717, 0.4918], [0.4436, 0.4698, 0.4888], [0.4468, 0.4676, 0.4823]],
        [[0.4277, 0.4696, 0.4950], [0.4300, 0.4674, 0.4916], [0.4326, 0.4654, 0.4859]],
    ],
]
# what `restore` delivers (the uint8 degraded input, restored, then the default wavelet colour fix)
DELIVERED = [
    [
        [[116, 119, 125], [124, 124, 134], [131, 132, 142]],
        [[118, 119, 125], [127, 125, 134], [134, 133, 142]],
        [[119, 118, 123], [128, 125, 133], [135, 133, 141]],
    ],
    [
        [[141, 120, 134], [140, 120, 135], [140, 120, 137]],
        [[141, 121, 133], [141, 120, 134], [140, 120, 136]],
        [[141, 121, 132], [140, 120, 133], [139, 119, 133]],
    ],
    [
        [[116, 127, 117], [116, 126, 117], [116, 126, 115]],
        [[114, 127, 118], [115, 127, 117], [115, 126, 116]],
        [[112, 127, 118], [112, 127, 118], [112, 126, 116]],
    ],
]
# The output gate hands much of the input back, so the model's own share of the output is small:
# 2e-3 (half a grey level) is what a 0.01 shift of the decoder's last bias moves these slices by
# (measured 4.7e-3), and 100 times what fp32 rounding on another CPU moves them.
RAW_ATOL = 2e-3
DELIVERED_LEVELS = 2  # the uint8 input and output may each round the other way somewhere


def pinned_input() -> torch.Tensor:
    """A fixed degraded 512-px face-like image in [0, 1]: the project's degradation at fixed
    parameters and seed, on one thread (as `degrade` runs it: sums in a fixed order)."""
    cfg = DegradationConfig(
        blur_sigma=(3.0, 3.0),
        anisotropic_prob=0.0,
        downsample=(4.0, 4.0),
        noise_sigma=(6.0, 6.0),
        jpeg_quality=(50, 50),
        grey_noise_prob=0.0,
    )
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return Degrader(cfg, seed=5)(to_tensor01([face_like(512, 11)]))[0]
    finally:
        torch.set_num_threads(saved)


def slices(image: np.ndarray) -> np.ndarray:
    return np.stack([image[y : y + 3, x : x + 3, :] for y, x in LOCATIONS])


def test_bundled_restorer_output_is_pinned() -> None:
    model = load_restorer(None, None, torch.device("cpu"), torch.float32)
    lq = pinned_input()
    with torch.no_grad():
        raw = ((model(lq * 2 - 1)[0] + 1) / 2).permute(1, 2, 0).numpy()
    got = slices(raw)
    assert np.abs(got - np.array(RAW)).max() <= RAW_ATOL, f"model output slices now:\n{np.round(got, 4).tolist()}"
    delivered = slices(restore_crops(model, to_images(lq), 1)[0]).astype(int)
    off = np.abs(delivered - np.array(DELIVERED)).max()
    assert off <= DELIVERED_LEVELS, f"restored slices now ({off} grey levels off):\n{delivered.tolist()}"
