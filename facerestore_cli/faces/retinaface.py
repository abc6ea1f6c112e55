"""RetinaFace (ResNet-50) detector from facexlib, used only when its weight file is already local.

facexlib's own loader downloads the weights from GitHub on first use; this project runs offline,
so we build the network ourselves and load `detection_Resnet50_Final.pth` from disk, or fail
with a one-line `DetectorUnavailable` that says where to put the file.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
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


def find_weights(path: Path) -> Path:
    """The weight file: `path` itself if it is a file, else `path/detection_Resnet50_Final.pth`."""
    path = Path(path)
    file = path if path.suffix == ".pth" or path.is_file() else path / WEIGHT_FILE
    if not file.is_file():
        raise DetectorUnavailable(
            f"RetinaFace weights not found at {file}: facexlib downloads them from GitHub, which is not "
            f"reachable offline; copy {WEIGHT_FILE} there or use --detector mtcnn"
        )
    return file


def load_retinaface(file: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """facexlib's RetinaFace with the state dict from `file` (a 'module.' prefix is stripped)."""
    try:
        from facexlib.detection.retinaface import RetinaFace
    except ImportError as e:  # facexlib is a declared dependency; say so if it is broken
        raise DetectorUnavailable(f"RetinaFace needs facexlib, which failed to import: {e}") from e
    device = torch.device(device)
    with warnings.catch_warnings():  # torchvision's 'pretrained' deprecation warning in facexlib
        warnings.simplefilter("ignore")
        model = RetinaFace(network_name="resnet50", half=False, phase="test", device=device)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}
    except Exception as e:  # corrupt or foreign file: report it on one line, not as a traceback
        raise DetectorUnavailable(f"cannot read RetinaFace weights {file} ({type(e).__name__}); expected facexlib's {WEIGHT_FILE}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DetectorUnavailable(f"{file} is not a RetinaFace ResNet-50 state dict: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


@lru_cache(maxsize=8)
def _priors(height: int, width: int) -> torch.Tensor:
    """Anchor boxes for an input size (facexlib's PriorBox is a Python loop: cache it)."""
    from facexlib.detection.retinaface import generate_config
    from facexlib.detection.retinaface_utils import PriorBox

    return PriorBox(generate_config("resnet50"), image_size=(height, width)).forward()


class RetinaFaceDetector:
    """`Detector` over facexlib's RetinaFace, at the images' original size, batched by size."""

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
        from facexlib.detection.retinaface_utils import (
            batched_decode,
            batched_decode_landm,
        )

        h, w = images[0].shape[:2]
        # The network was trained on BGR images minus the BGR mean, at any size.
        x = torch.from_numpy(np.stack(images)[..., ::-1].copy()).to(self.device)
        x = x.permute(0, 3, 1, 2).float() - self.mean
        loc, conf, landmarks = self.model(x)
        priors = _priors(h, w).to(self.device).unsqueeze(0)
        variance = self.model.cfg["variance"]
        boxes = batched_decode(loc, priors, variance) * torch.tensor([w, h] * 2, device=self.device)
        marks = batched_decode_landm(landmarks, priors, variance) * torch.tensor([w, h] * 5, device=self.device)
        out = []
        for b, s, m in zip(boxes, conf[..., 1], marks):
            keep = s > self.threshold
            b, s, m = b[keep], s[keep], m[keep]
            keep = nms(b, s, NMS_IOU)
            b, s, m = (t[keep].float().cpu().numpy() for t in (b, s, m))
            out.append(make_faces(b, s, m.reshape(-1, 5, 2), self.min_face_size))
        return out
