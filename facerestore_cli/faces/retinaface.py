"""RetinaFace (ResNet-50) detector, our own network loading facexlib's `detection_Resnet50_Final.pth`.

The weights are the ones facexlib 0.3.0 publishes (first trained in biubug6's Pytorch_Retinaface).
facexlib itself is not a dependency: it pulls `opencv-python` (next to our `opencv-python-headless`,
both providing `cv2`), numba and filterpy, and its loader downloads from GitHub, which this project
never does. So the network, its prior boxes and the decoding are written here from the file's
layout (456 tensors, 27.35 M elements) and the detector's published settings: anchors of
(16, 32), (64, 128) and (256, 512) px on the stride 8, 16 and 32 maps, variances (0.1, 0.2), boxes
not clipped, input BGR minus the mean (104, 117, 123). The file is read from disk or we fail with a
one-line `DetectorUnavailable` that says where to put it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet50
from torchvision.ops import nms

from facerestore_cli.faces.face import (
    DetectorUnavailable,
    Face,
    make_faces,
    match_faces,
)

WEIGHT_FILE = "detection_Resnet50_Final.pth"
NMS_IOU = 0.4
BGR_MEAN = (104.0, 117.0, 123.0)
#: Anchor sizes in pixels per pyramid level (two anchors per location), and the levels' strides.
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
#: Scales of the encoded centre offsets and log sizes (SSD-style box coding).
VARIANCES = (0.1, 0.2)
#: The ResNet-50 stages whose outputs feed the pyramid (strides 8, 16, 32; 512, 1024, 2048 channels).
BODY_CHANNELS = (512, 1024, 2048)
CHANNELS = 256
ANCHORS = 2


def _conv_bn(cin: int, cout: int, kernel: int = 3, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (keys `.0` and `.1`), then ReLU when `relu`.

    The upstream blocks use a LeakyReLU whose slope is 0 for 256-channel layers, i.e. a ReLU.
    """
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResNet50Body(nn.Module):
    """torchvision's ResNet-50 up to `layer4`, returning the outputs of layers 2, 3 and 4.

    The file's `body.*` keys are exactly torchvision's ResNet-50 module names (`conv1`, `bn1`,
    `layer1`-`layer4`, no `fc`: the upstream model wrapped torchvision's resnet50 in
    `IntermediateLayerGetter`). Reusing torchvision's blocks gives that layout and its exact
    computation (stride on the 3x3 conv) without re-deriving 318 tensors, so only the pyramid,
    the context modules and the heads are ours. This is the public-API equivalent of
    `IntermediateLayerGetter` (a private torchvision module): the same children, no `avgpool`/`fc`.
    """

    def __init__(self) -> None:
        super().__init__()
        net = resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


class FPN(nn.Module):
    """Feature pyramid: 1x1 lateral convs to 256 channels, top-down nearest upsampling, 3x3 merges."""

    def __init__(self) -> None:
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(c, CHANNELS, 1) for c in BODY_CHANNELS)
        self.merge1 = _conv_bn(CHANNELS, CHANNELS)
        self.merge2 = _conv_bn(CHANNELS, CHANNELS)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        p5 = self.output3(c5)
        p4 = self.merge2(self.output2(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest"))
        p3 = self.merge1(self.output1(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Context module: 3x3, "5x5" (two 3x3) and "7x7" (three 3x3, sharing the first) branches with
    1/2, 1/4 and 1/4 of the channels, concatenated, then ReLU. Key names keep upstream's mixed case."""

    def __init__(self, channels: int = CHANNELS) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.conv3X3 = _conv_bn(channels, half, relu=False)
        self.conv5X5_1 = _conv_bn(channels, quarter)
        self.conv5X5_2 = _conv_bn(quarter, quarter, relu=False)
        self.conv7X7_2 = _conv_bn(quarter, quarter)
        self.conv7x7_3 = _conv_bn(quarter, quarter, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5 = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(branch5), self.conv7x7_3(self.conv7X7_2(branch5))], dim=1)
        return F.relu(out)


class Head(nn.Module):
    """A 1x1 conv predicting `per_anchor` numbers for each of the `ANCHORS` anchors at each location."""

    def __init__(self, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(CHANNELS, ANCHORS * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, A*k, H, W) -> (N, H*W*A, k): row-major locations, anchors innermost, as prior_boxes orders them
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFaceR50(nn.Module):
    """RetinaFace with a ResNet-50 body, in the layout of facexlib's `detection_Resnet50_Final.pth`.

    forward(x): x is (N, 3, H, W) float BGR minus `BGR_MEAN`, any H and W. Returns, over all
    `prior_boxes(H, W)` in order: box offsets (N, P, 4), class probabilities (N, P, 2) (softmax;
    column 1 is "face") and landmark offsets (N, P, 10); decode with `decode_boxes`/`decode_landmarks`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = ResNet50Body()
        self.fpn = FPN()
        self.ssh1, self.ssh2, self.ssh3 = SSH(), SSH(), SSH()
        self.ClassHead = nn.ModuleList(Head(2) for _ in STEPS)
        self.BboxHead = nn.ModuleList(Head(4) for _ in STEPS)
        self.LandmarkHead = nn.ModuleList(Head(10) for _ in STEPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self.fpn(*self.body(x))
        features = [ssh(p) for ssh, p in zip((self.ssh1, self.ssh2, self.ssh3), levels)]

        def run(heads: nn.ModuleList) -> torch.Tensor:
            return torch.cat([head(f) for head, f in zip(heads, features)], dim=1)

        return run(self.BboxHead), F.softmax(run(self.ClassHead), dim=-1), run(self.LandmarkHead)


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """The anchors (P, 4) as (centre x, centre y, width, height), relative to the image size.

    For each level (stride s, sizes m): a ceil(H/s) x ceil(W/s) grid, row by row, each location
    with centre ((j + 0.5) s / W, (i + 0.5) s / H) and, innermost, one anchor per size m of
    (m / W, m / H). Not clipped to [0, 1]. P = sum over levels of 2 * ceil(H/s) * ceil(W/s).
    """
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = -(-height // step), -(-width // step)
        cy, cx = torch.meshgrid(
            (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height,
            (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width,
            indexing="ij",
        )
        per_size = [torch.stack([cx, cy, torch.full_like(cx, m / width), torch.full_like(cx, m / height)], dim=-1) for m in sizes]
        out.append(torch.stack(per_size, dim=2).reshape(-1, 4))
    return torch.cat(out).float()


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """Offsets (..., P, 4) -> boxes (..., P, 4) as (x1, y1, x2, y2) relative to the image size.

    centre = prior centre + loc[:2] * v0 * prior size; size = prior size * exp(loc[2:] * v1).
    """
    centre = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=-1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """Offsets (..., P, 10) -> 5 points (..., P, 10) as x, y pairs: prior centre + offset * v0 * prior size."""
    points = priors[..., None, :2] + pre.unflatten(-1, (5, 2)) * variances[0] * priors[..., None, 2:]
    return points.flatten(-2)


def find_weights(path: Path) -> Path:
    """The weight file: `path` itself if it is a file, else `path/detection_Resnet50_Final.pth`."""
    path = Path(path)
    file = path if path.suffix == ".pth" or path.is_file() else path / WEIGHT_FILE
    if not file.is_file():
        raise DetectorUnavailable(
            f"RetinaFace weights not found at {file}: facexlib publishes them on GitHub, which is not "
            f"reachable offline; copy {WEIGHT_FILE} there or use --detector mtcnn"
        )
    return file


def load_retinaface(file: Path, device: str | torch.device = "cpu") -> RetinaFaceR50:
    """`RetinaFaceR50` with the state dict from `file` ('module.' prefixes stripped), loaded strictly."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: report it on one line, not as a traceback
        raise DetectorUnavailable(f"cannot read RetinaFace weights {file} ({type(e).__name__}); expected facexlib's {WEIGHT_FILE}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DetectorUnavailable(f"{file} is not a RetinaFace ResNet-50 state dict (expected a dict of tensors, facexlib's {WEIGHT_FILE})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = RetinaFaceR50()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing / unexpected keys, size mismatches: one line, shortened
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip()) or str(e)
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise DetectorUnavailable(f"{file} is not a RetinaFace ResNet-50 state dict: {detail}") from e
    return model.to(torch.device(device)).eval()


@lru_cache(maxsize=8)
def _priors(height: int, width: int) -> torch.Tensor:
    """`prior_boxes`, cached per input size (videos repeat one size)."""
    return prior_boxes(height, width)


class RetinaFaceDetector:
    """`Detector` over `RetinaFaceR50`, at the images' original size, batched by size."""

    def __init__(self, weights: Path, device: str = "cpu", threshold: float = 0.7, min_face_size: int = 20):
        self.device = torch.device(device)
        self.model = load_retinaface(find_weights(weights), self.device)
        self.threshold = float(threshold)
        self.min_face_size = int(min_face_size)
        self.mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        results: list[list[Face]] = [[] for _ in images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(f"RetinaFace expects RGB uint8 HxWx3 images, got {im.dtype} {im.shape}")
            by_size.setdefault(im.shape[:2], []).append(i)
        for ids in by_size.values():
            for i, faces in zip(ids, self._detect_same_size([images[i] for i in ids])):
                results[i] = faces
        return results

    def follow(self, image: np.ndarray, faces: list[Face]) -> list[Face | None]:
        """RetinaFace has no cheap refining stage: search the whole image, keep what overlaps."""
        return match_faces(self.detect([image])[0], faces)

    @torch.inference_mode()
    def _detect_same_size(self, images: list[np.ndarray]) -> list[list[Face]]:
        h, w = images[0].shape[:2]
        # The network was trained on BGR images minus the BGR mean, at any size.
        x = torch.from_numpy(np.stack(images)[..., ::-1].copy()).to(self.device)
        x = x.permute(0, 3, 1, 2).float() - self.mean
        loc, conf, landmarks = self.model(x)
        priors = _priors(h, w).to(self.device)
        boxes = decode_boxes(loc, priors) * torch.tensor([w, h] * 2, device=self.device)
        marks = decode_landmarks(landmarks, priors) * torch.tensor([w, h] * 5, device=self.device)
        out = []
        for b, s, m in zip(boxes, conf[..., 1], marks):
            keep = s > self.threshold
            b, s, m = b[keep], s[keep], m[keep]
            keep = nms(b, s, NMS_IOU)
            b, s, m = (t[keep].float().cpu().numpy() for t in (b, s, m))
            out.append(make_faces(b, s, m.reshape(-1, 5, 2), self.min_face_size))
        return out
