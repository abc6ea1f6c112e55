"""MTCNN face detector (P-Net, R-Net, O-Net cascade), batched over images of any size.

The networks are written here from the published architecture; layer names match the state
dicts shipped in `weights/mtcnn/` (the facenet-pytorch 2.6.0 port of the original Caffe model),
so they load with `strict=True`. Two facts of that port matter: inputs are normalised as
`(x - 127.5) / 128`, and R-Net/O-Net flatten their feature maps in (width, height) order because
the Caffe model was trained on transposed (MATLAB column-major) images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, roi_align

PYRAMID_FACTOR = 0.709
PNET_CELL, PNET_STRIDE = 12, 2
#: Input pixels per P-Net pass (about eight 1080p frames) to bound memory on big batches.
PNET_PIXELS_PER_PASS = 16_000_000


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Map uint8-range pixels to the range the Caffe model was trained on."""
    return (x - 127.5) * 0.0078125


def _flatten_wh(x: torch.Tensor) -> torch.Tensor:
    """Flatten NCHW as N-W-H-C: the dense layers were trained on transposed images."""
    return x.permute(0, 3, 2, 1).flatten(1)


class PNet(nn.Module):
    """Fully convolutional 12x12 proposal net: face probability and box offsets per cell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """24x24 refinement net: rejects most P-Net proposals and refines their boxes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_wh(x)))
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """48x48 output net: final score, box offsets and five landmarks relative to the box."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_wh(x)))
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


@dataclass
class Detections:
    """Per-image MTCNN output in image pixels: boxes (N,4) x1y1x2y2, scores (N,), landmarks (N,5,2).

    Landmarks are in the order the network emits: left eye, right eye, nose, left and right
    mouth corner, as seen in the image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray


@dataclass
class _Group:
    """Images of one size stacked as float NCHW 0..255, with their positions in the input list."""

    images: torch.Tensor
    ids: torch.Tensor


def _box_wh(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The Caffe model uses inclusive pixel boxes, hence the +1.
    return boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply the nets' box offsets, which are fractions of the box width/height."""
    w, h = _box_wh(boxes)
    return boxes + offsets * torch.stack([w, h, w, h], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow boxes to squares about their centres: the next net expects square crops."""
    w, h = _box_wh(boxes)
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + (w - side) * 0.5
    y1 = boxes[:, 1] + (h - side) * 0.5
    return torch.stack([x1, y1, x1 + side - 1, y1 + side - 1], dim=1)


def _edge_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """The nets' 1-based inclusive boxes as 0-based pixel-edge boxes, the frame landmarks are in."""
    return boxes - torch.tensor([1.0, 1.0, 0.0, 0.0], device=boxes.device)


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, thr: float) -> torch.Tensor:
    """Greedy NMS on intersection over the smaller area, per image.

    The final stage uses this ("Min" mode of the original) so a small box lying inside a bigger
    one is dropped even when their IoU is low. Candidates are few here, so a loop is cheap.
    """
    order = torch.argsort(scores, descending=True)
    boxes, idxs = boxes[order], idxs[order]
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    x1y1 = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    x2y2 = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (x2y2 - x1y1 + 1).clamp(min=0).prod(dim=2)
    overlap = inter / torch.minimum(area[:, None], area[None, :])
    overlap = overlap.masked_fill(idxs[:, None] != idxs[None, :], 0.0).cpu()
    alive = torch.ones(len(boxes), dtype=torch.bool)
    for i in range(len(boxes)):
        if alive[i]:
            alive[i + 1 :] &= overlap[i, i + 1 :] <= thr
    return order[alive.to(order.device)]


class MTCNN(nn.Module):
    """The three-stage cascade over a batch of RGB uint8 images of possibly different sizes.

    thresholds: minimum face probability after P-Net, R-Net and O-Net; the last one is the
    detector's user-facing "threshold". min_face_size: smallest face side in pixels searched for.
    """

    def __init__(
        self,
        weights_dir: Path,
        device: str | torch.device = "cpu",
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        min_face_size: int = 20,
    ) -> None:
        super().__init__()
        if min_face_size < 1:
            raise ValueError(f"min_face_size must be at least 1 pixel, got {min_face_size}")
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for name in ("pnet", "rnet", "onet"):
            state = torch.load(Path(weights_dir) / f"{name}.pt", map_location="cpu", weights_only=True)
            getattr(self, name).load_state_dict(state, strict=True)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.min_face_size = int(min_face_size)
        self.device = torch.device(device)
        self.to(self.device).eval()

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """Detect faces in each image; results keep the order of `images`.

        Images of equal size share P-Net passes; R-Net and O-Net see the crops of all images in
        one batch. No padding is involved, so an image's result does not depend on its batch.
        """
        if not images:
            return []
        groups = self._size_groups(images)
        props = [self._stage_pnet(g) for g in groups]
        boxes = torch.cat([p[0] for p in props])
        idx = torch.cat([p[1] for p in props])
        boxes, idx = self._stage_rnet(groups, boxes, idx)
        boxes, scores, marks, idx = self._stage_onet(groups, boxes, idx)
        return self._split(len(images), boxes, scores, marks, idx)

    def _size_groups(self, images: list[np.ndarray]) -> list[_Group]:
        """Stack images of equal size into float NCHW tensors (pixel range 0..255)."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(f"MTCNN expects RGB uint8 HxWx3 images, got {im.dtype} {im.shape}")
            by_size.setdefault(im.shape[:2], []).append(i)
        groups = []
        for ids in by_size.values():
            stack = torch.from_numpy(np.stack([images[i] for i in ids])).to(self.device)
            groups.append(_Group(stack.permute(0, 3, 1, 2).float(), torch.tensor(ids, device=self.device)))
        return groups

    def _scales(self, min_side: int) -> list[float]:
        """Pyramid scales that map min_face_size to the 12 px P-Net cell, down to a 12 px image."""
        m = PNET_CELL / self.min_face_size
        scales, side = [], min_side * m
        while side >= PNET_CELL:
            scales.append(m * PYRAMID_FACTOR ** len(scales))
            side *= PYRAMID_FACTOR
        return scales

    def _stage_pnet(self, group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
        """Run P-Net over the pyramid; NMS per scale and image, then across scales.

        Returns square boxes [x1,y1,x2,y2,score] (1-based inclusive pixels) and image indices.
        Big batches go through in chunks so the first pyramid level stays within memory.
        """
        _, _, h, w = group.images.shape
        chunk = max(1, PNET_PIXELS_PER_PASS // (h * w))
        all_boxes, all_idx = [], []
        for start in range(0, len(group.ids), chunk):
            images = group.images[start : start + chunk]
            for scale in self._scales(min(h, w)):
                level = F.interpolate(images, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
                prob, reg = self.pnet(_normalise(level))
                boxes, local = self._pnet_boxes(prob, reg, scale)
                if len(boxes):
                    keep = batched_nms(boxes[:, :4], boxes[:, 4], local, 0.5)
                    all_boxes.append(boxes[keep])
                    all_idx.append(group.ids[start + local[keep]])
        if not all_boxes:
            return torch.zeros(0, 5, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device)
        boxes, idx = torch.cat(all_boxes), torch.cat(all_idx)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], idx, 0.7)
        boxes, idx = boxes[keep], idx[keep]
        out = _square(_regress(boxes[:, :4], boxes[:, 5:9]))
        return torch.cat([out, boxes[:, 4:5]], dim=1), idx

    def _pnet_boxes(self, prob: torch.Tensor, reg: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Cells above threshold as image-space boxes [x1,y1,x2,y2,score,4 offsets], batch index."""
        cells = (prob >= self.thresholds[0]).nonzero()
        img, row, col = cells[:, 0], cells[:, 1], cells[:, 2]
        xy = torch.stack([col, row], dim=1).float()
        q1 = ((PNET_STRIDE * xy + 1) / scale).floor()
        q2 = ((PNET_STRIDE * xy + PNET_CELL) / scale).floor()
        score = prob[img, row, col].unsqueeze(1)
        offsets = reg[img, :, row, col]
        return torch.cat([q1, q2, score, offsets], dim=1), img

    def _crops(self, groups: list[_Group], boxes: torch.Tensor, idx: torch.Tensor, size: int) -> torch.Tensor:
        """Crop-and-resize every box to size x size, area-averaged; outside the image reads black.

        Each box is sampled from a 2x mip level where it is 2-4 times the output size, so
        roi_align averages at most 4x4 samples per output pixel however big the box is.
        """
        crops = torch.zeros(len(boxes), 3, size, size, device=self.device)
        side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).clamp(min=1)
        level = torch.log2(side / (2 * size)).floor().clamp(min=0).long()
        n = sum(len(g.ids) for g in groups)
        group_of = torch.empty(n, dtype=torch.long, device=self.device)
        local_of = torch.empty(n, dtype=torch.long, device=self.device)
        for k, g in enumerate(groups):
            group_of[g.ids] = k
            local_of[g.ids] = torch.arange(len(g.ids), device=self.device)
        for k, g in enumerate(groups):
            images = g.images
            for lv in range(int(level.max()) + 1 if len(level) else 0):
                if lv:
                    images = F.avg_pool2d(images, 2, ceil_mode=True)
                sel = (group_of[idx] == k) & (level == lv)
                if not sel.any():
                    continue
                # Boxes are 1-based inclusive pixels: edges [x1 - 1, x2) in 0-based terms.
                b = boxes[sel]
                rois = torch.cat([local_of[idx[sel]].float().unsqueeze(1), b[:, :2] - 1, b[:, 2:4]], dim=1)
                crops[sel] = roi_align(images, rois, (size, size), spatial_scale=0.5**lv, sampling_ratio=-1, aligned=True)
        return _normalise(crops)

    def _stage_rnet(self, groups: list[_Group], boxes: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(boxes) == 0:
            return boxes, idx
        prob, reg = self.rnet(self._crops(groups, boxes, idx, 24))
        keep = prob > self.thresholds[1]
        boxes, idx, prob, reg = boxes[keep], idx[keep], prob[keep], reg[keep]
        keep = batched_nms(boxes[:, :4], prob, idx, 0.7)
        boxes, idx, prob, reg = boxes[keep], idx[keep], prob[keep], reg[keep]
        out = _square(_regress(boxes[:, :4], reg))
        return torch.cat([out, prob.unsqueeze(1)], dim=1), idx

    def _stage_onet(
        self, groups: list[_Group], boxes: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(boxes) == 0:
            return boxes[:, :4], boxes[:, 4], torch.zeros(0, 5, 2, device=boxes.device), idx
        prob, boxes, marks = self._onet(groups, boxes[:, :4], idx)
        keep = prob > self.thresholds[2]
        boxes, idx, prob, marks = boxes[keep], idx[keep], prob[keep], marks[keep]
        keep = _nms_min(boxes, prob, idx, 0.7)
        return _edge_boxes(boxes[keep]), prob[keep], marks[keep], idx[keep]

    def _onet(self, groups: list[_Group], boxes: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """O-Net on square boxes: each one's face probability, regressed box and landmarks (N,5,2)."""
        prob, reg, marks = self.onet(self._crops(groups, boxes, idx, 48))
        # Landmarks are fractions of the (pre-regression) box: x in the first 5, y in the last 5.
        w, h = _box_wh(boxes)
        lx = boxes[:, 0:1] + w.unsqueeze(1) * marks[:, :5] - 1
        ly = boxes[:, 1:2] + h.unsqueeze(1) * marks[:, 5:] - 1
        return prob, _regress(boxes, reg), torch.stack([lx, ly], dim=2)

    @torch.inference_mode()
    def refine(self, image: np.ndarray, boxes: np.ndarray) -> Detections:
        """O-Net alone on given boxes of one image (a video's faces of the frame before, looked
        for in this one): one result per box, in order, however low its score. The box grows
        to a square about its centre and O-Net's regression moves it onto the face, so a face
        that moved a fraction of its size is found again for one 48-px view, not a pyramid.
        """
        boxes_t = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4), device=self.device)
        if not len(boxes_t):
            return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
        squares = _square(boxes_t + torch.tensor([1.0, 1.0, 0.0, 0.0], device=self.device))
        groups, local, origins = self._regions(image, squares)
        prob, found, marks = self._onet(groups, local, torch.arange(len(squares), device=self.device))
        found = found + origins.repeat(1, 2)
        marks = marks + origins[:, None, :]
        idx = torch.zeros(len(found), dtype=torch.long)
        return self._split(1, _edge_boxes(found), prob, marks, idx)[0]

    def _regions(self, image: np.ndarray, squares: torch.Tensor) -> tuple[list[_Group], torch.Tensor, torch.Tensor]:
        """Each square's surroundings cut from `image` as an image of its own (no float copy of a
        whole 1080p frame for a few faces): the groups, the squares in them, and their origins."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"MTCNN expects an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        groups, origins = [], []
        for i, (x1, y1, x2, y2) in enumerate(squares.tolist()):
            # 1-based inclusive box -> 0-based pixel range, two pixels wider for the sampling.
            x0, y0 = min(max(int(x1) - 3, 0), w - 1), min(max(int(y1) - 3, 0), h - 1)
            xe, ye = max(min(int(x2) + 2, w), x0 + 1), max(min(int(y2) + 2, h), y0 + 1)
            crop = torch.from_numpy(np.ascontiguousarray(image[None, y0:ye, x0:xe])).to(self.device)
            groups.append(_Group(crop.permute(0, 3, 1, 2).float(), torch.tensor([i], device=self.device)))
            origins.append([x0, y0])
        origins_t = torch.tensor(origins, dtype=torch.float32, device=self.device)
        return groups, squares - origins_t.repeat(1, 2), origins_t

    @staticmethod
    def _split(n: int, boxes: torch.Tensor, scores: torch.Tensor, marks: torch.Tensor, idx: torch.Tensor) -> list[Detections]:
        boxes, scores, marks, idx = (t.float().cpu().numpy() for t in (boxes, scores, marks, idx))
        return [
            Detections(boxes[idx == i].astype(np.float32), scores[idx == i].astype(np.float32), marks[idx == i].astype(np.float32))
            for i in range(n)
        ]
