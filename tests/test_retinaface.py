"""Our RetinaFace ResNet-50: facexlib's file layout, prior boxes, box/landmark decoding, and no facexlib."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facerestore_cli.faces.face import DetectorUnavailable
from facerestore_cli.faces.retinaface import (
    VARIANCES,
    WEIGHT_FILE,
    RetinaFaceR50,
    decode_boxes,
    decode_landmarks,
    load_retinaface,
    prior_boxes,
)

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return RetinaFaceR50().state_dict()


@pytest.fixture(scope="module")
def weight_file(state, tmp_path_factory) -> Path:
    """Our random weights saved as the published file is: a plain state dict, DataParallel's 'module.' prefix."""
    file = tmp_path_factory.mktemp("retinaface") / WEIGHT_FILE
    torch.save({f"module.{k}": v for k, v in state.items()}, file)
    return file


def test_layout_has_the_published_file_facts(state):
    """SPEC §5 (facexlib 0.3.0): 456 tensors, 27.35 M elements, 318 `body.*` tensors (torchvision
    ResNet-50 without fc), FPN laterals from 512/1024/2048 to 256, SSH names in mixed case, and
    heads of 2 anchors per location."""
    assert len(state) == 456
    assert round(sum(v.numel() for v in state.values()) / 1e6, 2) == 27.35
    body = [k for k in state if k.startswith("body.")]
    assert len(body) == 318 and not any(k.startswith("body.fc") for k in body)
    assert {k.split(".")[1] for k in body} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert "body.layer1.0.conv1.weight" in state and "body.bn1.num_batches_tracked" in state
    for i, cin in zip((1, 2, 3), (512, 1024, 2048)):
        assert state[f"fpn.output{i}.0.weight"].shape == (256, cin, 1, 1)
        assert f"fpn.output{i}.1.running_var" in state
    for i in (1, 2):
        assert state[f"fpn.merge{i}.0.weight"].shape == (256, 256, 3, 3)
    for i in (1, 2, 3):
        for name in ("conv3X3", "conv5X5_1", "conv5X5_2", "conv7X7_2", "conv7x7_3"):
            assert f"ssh{i}.{name}.0.weight" in state and f"ssh{i}.{name}.1.running_mean" in state
    for i in range(3):
        assert state[f"ClassHead.{i}.conv1x1.weight"].shape == (4, 256, 1, 1)
        assert state[f"BboxHead.{i}.conv1x1.weight"].shape == (8, 256, 1, 1)
        assert state[f"LandmarkHead.{i}.conv1x1.weight"].shape == (20, 256, 1, 1)
        assert state[f"LandmarkHead.{i}.conv1x1.bias"].shape == (20,)


def _key_shapes(node) -> dict[str, tuple[int, ...]] | None:
    """The {key: shape} map in a key-list JSON: values [shape, dtype], [shape] or {"shape": ...}, possibly nested."""
    if isinstance(node, dict) and "fpn.output1.0.weight" in node:
        out = {}
        for k, v in node.items():
            shape = v.get("shape") if isinstance(v, dict) else v[0] if v and isinstance(v[0], list) else v
            out[k] = tuple(shape)
        return out
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        found = _key_shapes(child)
        if found:
            return found
    return None


def test_layout_matches_the_upstream_notes(state):
    """Against ../shared/upstream: the full key list with shapes when keys/ has a RetinaFace file,
    and SPEC §5's RetinaFace-R50 row (tensor and element counts) either way."""
    if not UPSTREAM.is_dir():
        pytest.skip(f"upstream notes absent: {UPSTREAM} (shared/upstream is outside the repository)")
    ours = {k: tuple(v.shape) for k, v in state.items()}
    files = sorted(p for p in (UPSTREAM / "keys").glob("*.json") if re.search("retina|facexlib", p.name, re.I))
    for file in files:
        theirs = _key_shapes(json.loads(file.read_text(encoding="utf-8")))
        assert theirs is not None, f"no RetinaFace keys found in {file}"
        theirs = {k.removeprefix("module."): v for k, v in theirs.items()}
        assert ours == theirs, (
            f"layout differs from {file.name}: missing {sorted(theirs.keys() - ours.keys())[:5]}, extra {sorted(ours.keys() - theirs.keys())[:5]}"
        )
    spec = (UPSTREAM / "SPEC.md").read_text(encoding="utf-8")
    row = re.search(r"\|\s*RetinaFace-R50\s*\|\s*(\d+)\s*/\s*([\d.]+)\s*M", spec)
    assert row, "SPEC.md has no RetinaFace-R50 row"
    assert len(state) == int(row[1])
    assert round(sum(v.numel() for v in state.values()) / 1e6, 2) == float(row[2])
    assert "conv7x7_3" in spec and "[20,256,1,1]" in spec


def test_loader_reads_the_file_strict_with_module_prefix(weight_file, state, tmp_path):
    model = load_retinaface(weight_file)
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    def fails(bad: dict, *words: str) -> None:
        file = tmp_path / "bad.pth"
        torch.save(bad, file)
        with pytest.raises(DetectorUnavailable) as err:
            load_retinaface(file)
        msg = str(err.value)
        assert "\n" not in msg and "not a RetinaFace ResNet-50 state dict" in msg and str(file) in msg
        assert all(w in msg for w in words), msg

    fails({k: v for k, v in state.items() if k != "fpn.merge1.0.weight"}, "fpn.merge1.0.weight", "Missing")
    fails({**state, "fc.weight": torch.zeros(1)}, "fc.weight", "Unexpected")
    fails({**state, "ClassHead.0.conv1x1.weight": torch.zeros(6, 256, 1, 1)}, "ClassHead.0.conv1x1.weight", "size mismatch")
    fails({"state_dict": state}, "dict of tensors")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(DetectorUnavailable, match="cannot read RetinaFace weights"):
        load_retinaface(tmp_path / "junk.pth")


def test_prior_boxes_for_640x480():
    """Per stride s and its two sizes m: ceil(H/s) x ceil(W/s) locations row by row, sizes innermost,
    (cx, cy, w, h) = ((j + .5) s / W, (i + .5) s / H, m / W, m / H)."""
    h, w = 480, 640
    priors = prior_boxes(h, w)
    assert priors.dtype == torch.float32
    assert priors.shape == ((60 * 80 + 30 * 40 + 15 * 20) * 2, 4) == (12600, 4)

    def row(s: int, m: int, i: int, j: int) -> list[float]:
        return [(j + 0.5) * s / w, (i + 0.5) * s / h, m / w, m / h]

    expect = [row(8, 16, 0, 0), row(8, 32, 0, 0), row(8, 16, 0, 1), row(8, 32, 0, 1)]
    np.testing.assert_allclose(priors[:4].numpy(), expect, rtol=1e-6)
    np.testing.assert_allclose(priors[2 * 80].numpy(), row(8, 16, 1, 0), rtol=1e-6)  # second grid row
    np.testing.assert_allclose(priors[9600].numpy(), row(16, 64, 0, 0), rtol=1e-6)  # first of stride 16
    np.testing.assert_allclose(priors[12000:12002].numpy(), [row(32, 256, 0, 0), row(32, 512, 0, 0)], rtol=1e-6)
    np.testing.assert_allclose(priors[-1].numpy(), row(32, 512, 14, 19), rtol=1e-6)
    # Sizes that do not divide by the strides round up, not clipped to the image.
    assert prior_boxes(481, 641).shape[0] == (61 * 81 + 31 * 41 + 16 * 21) * 2
    assert prior_boxes(481, 641)[:, :2].max() > 1.0


def test_network_outputs_one_row_per_prior(state):
    model = RetinaFaceR50()
    model.load_state_dict(state)
    with torch.inference_mode():
        loc, conf, marks = model.eval()(torch.randn(2, 3, 50, 70))
    n = prior_boxes(50, 70).shape[0]
    assert loc.shape == (2, n, 4) and conf.shape == (2, n, 2) and marks.shape == (2, n, 10)
    torch.testing.assert_close(conf.sum(-1), torch.ones(2, n))


def test_decode_round_trips_known_boxes_and_landmarks():
    """Encode boxes and 5 points against their priors by the inverse formula; decoding gives them back."""
    v0, v1 = VARIANCES
    priors = prior_boxes(480, 640)[torch.tensor([0, 1, 5001, 9600, 12001, 12599])]
    g = torch.Generator().manual_seed(0)
    centre = priors[:, :2] + (torch.rand(6, 2, generator=g) - 0.5) * priors[:, 2:]
    size = priors[:, 2:] * (0.5 + torch.rand(6, 2, generator=g))
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    points = centre[:, None] + (torch.rand(6, 5, 2, generator=g) - 0.5) * size[:, None]
    loc = torch.cat([(centre - priors[:, :2]) / (v0 * priors[:, 2:]), torch.log(size / priors[:, 2:]) / v1], dim=1)
    pre = ((points - priors[:, None, :2]) / (v0 * priors[:, None, 2:])).flatten(1)
    torch.testing.assert_close(decode_boxes(loc, priors), boxes, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(decode_landmarks(pre, priors), points.flatten(1), atol=1e-6, rtol=1e-5)
    # Batched: (N, P, k) outputs against (P, 4) priors.
    torch.testing.assert_close(decode_boxes(loc.expand(3, -1, -1), priors)[2], boxes, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(decode_landmarks(pre.expand(3, -1, -1), priors)[1], points.flatten(1), atol=1e-6, rtol=1e-5)
    # Zero offsets decode to the prior box itself and to its centre.
    zero = decode_boxes(torch.zeros(6, 4), priors)
    torch.testing.assert_close(zero, torch.cat([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1))
    torch.testing.assert_close(decode_landmarks(torch.zeros(6, 10), priors), priors[:, :2].repeat(1, 5))


def test_detection_runs_without_facexlib(weight_file):
    """In a fresh interpreter where `import facexlib` fails, the detector loads the file and detects."""
    code = (
        "import sys; sys.modules['facexlib'] = None\n"
        "import numpy as np\n"
        "from facerestore_cli.faces import build_detector\n"
        f"det = build_detector('retinaface', weights_dir={str(weight_file)!r}, threshold=0.0, min_face_size=0)\n"
        "out = det.detect([np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8)])\n"
        "assert len(out) == 1 and len(out[0]) > 0, out\n"
        "assert sys.modules['facexlib'] is None and not any(m.startswith('facexlib.') for m in sys.modules)\n"
        "print('ok', len(out[0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
