"""Face detection (MTCNN, RetinaFace wrapper), FFHQ alignment and paste-back."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facerestore_cli.faces import build_detector, estimate_affine, face_template, paste_faces, scale_affine, warp_faces
from facerestore_cli.faces.align import feather_mask
from facerestore_cli.faces.face import DetectorUnavailable, Face

PHOTOS = "faces/train/photos"

# Face counts checked by eye on drawn boxes and landmarks (every face in these photos is frontal
# or three-quarter, unoccluded, inside the frame and at least ~30 px; no background crowd).
COUNTED = {
    "face-api.js/bbt1.jpg": 4,
    "face-api.js/bbt3.jpg": 5,
    "face-api.js/bbt4.jpg": 6,
    "face-api.js/bbt5.jpg": 5,
    "facenet-pytorch/multiface.jpg": 6,
    "deepface_tests/couple.jpg": 2,
    "Barbershop/117.jpg": 1,
    "GPEN_ffhq-10/00000.jpg": 1,
}


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, f"unreadable test photo {path}"
    return np.ascontiguousarray(bgr[:, :, ::-1])


@pytest.fixture(scope="module")
def detector():
    return build_detector("mtcnn")


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> dict[str, np.ndarray]:
    root = shared_data / PHOTOS
    missing = [n for n in COUNTED if not (root / n).is_file()]
    if missing:
        pytest.skip(f"test photos missing under {root}: {', '.join(missing)}")
    return {name: read_rgb(root / name) for name in COUNTED}


@pytest.fixture(scope="module")
def detections(detector, photos) -> dict[str, list[Face]]:
    """All counted photos (several sizes) in one batched call."""
    names = list(photos)
    return dict(zip(names, detector.detect([photos[n] for n in names])))


def grad_mag(image: np.ndarray) -> np.ndarray:
    grey = image.astype(np.float32).mean(axis=2)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3) / 8
    return np.hypot(gx, gy)


def crop_footprint(affine: np.ndarray, size: int, shape: tuple[int, ...], margin: float = 0.0) -> np.ndarray:
    """Image pixels whose position maps inside the crop square grown by `margin` crop pixels."""
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    a = np.asarray(affine, np.float64)
    u = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
    v = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
    return (u > -1 - margin) & (u < size + margin) & (v > -1 - margin) & (v < size + margin)


# --- detection -------------------------------------------------------------------------------


def test_counts_on_photos(detections):
    counts = {name: len(faces) for name, faces in detections.items()}
    assert counts == COUNTED


def test_face_fields_and_landmark_order(detections):
    for name, faces in detections.items():
        areas = [f.area for f in faces]
        assert areas == sorted(areas, reverse=True), name
        for f in faces:
            assert f.box.shape == (4,) and f.box.dtype == np.float32
            assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
            assert 0.7 <= f.score <= 1.0
            (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = f.landmarks
            assert lex < rex and lmx < rmx, f"{name}: left/right swapped"
            assert max(ley, rey) < ny < min(lmy, rmy), f"{name}: eyes, nose, mouth out of order"
            x1, y1, x2, y2 = f.box
            assert ((f.landmarks[:, 0] > x1) & (f.landmarks[:, 0] < x2)).all(), name
            assert ((f.landmarks[:, 1] > y1) & (f.landmarks[:, 1] < y2)).all(), name


def test_batch_result_does_not_depend_on_batch(detector, photos, detections):
    name = "facenet-pytorch/multiface.jpg"
    alone = detector.detect([photos[name]])[0]
    batched = detections[name]
    assert len(alone) == len(batched)
    for a, b in zip(alone, batched):
        np.testing.assert_allclose(a.box, b.box, atol=1e-3)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)


def test_threshold_and_min_face_size(photos, detections):
    name = "face-api.js/bbt4.jpg"  # six faces, each about 50-60 px wide
    strict = build_detector("mtcnn", threshold=0.999999).detect([photos[name]])[0]
    assert len(strict) < len(detections[name])
    assert build_detector("mtcnn", min_face_size=120).detect([photos[name]])[0] == []


def test_empty_inputs(detector):
    assert detector.detect([]) == []
    blank = np.full((64, 80, 3), 128, np.uint8)
    tiny = np.zeros((8, 8, 3), np.uint8)  # smaller than one P-Net cell
    assert detector.detect([blank, tiny]) == [[], []]


def test_rejects_non_rgb(detector):
    with pytest.raises(ValueError):
        detector.detect([np.zeros((32, 32), np.uint8)])


def test_one_photo_on_its_own_finds_its_faces(detector, photos, detections):
    """The call `restore` makes for a single photo (a batch of one) finds every face counted by
    eye, where the batched call found them. (Its time is measured in benchmarks/bench_detect.py.)"""
    name = "face-api.js/bbt4.jpg"
    alone = detector.detect([photos[name]])[0]
    assert len(alone) == COUNTED[name] == len(detections[name])
    assert all(0.7 <= f.score <= 1.0 for f in alone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(photos, detections):
    name = "face-api.js/bbt3.jpg"
    faces = build_detector("mtcnn", device="cuda").detect([photos[name]])[0]
    assert len(faces) == len(detections[name])
    for a, b in zip(faces, detections[name]):
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1.0)


def test_unknown_detector_and_missing_weights(tmp_path):
    with pytest.raises(DetectorUnavailable, match="unknown detector"):
        build_detector("yolo")
    with pytest.raises(DetectorUnavailable, match="MTCNN weights not found"):
        build_detector("mtcnn", weights_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(DetectorUnavailable, match="CUDA"):
            build_detector("mtcnn", device="cuda")


def test_retinaface_missing_weights_message(tmp_path):
    with pytest.raises(DetectorUnavailable) as err:
        build_detector("retinaface", weights_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "detection_Resnet50_Final.pth") in msg
    assert "--detector mtcnn" in msg and "\n" not in msg


def test_retinaface_wrapper_loads_a_local_file(tmp_path):
    """Random weights in facexlib's file layout (with DataParallel's 'module.' prefix) load and run."""
    from facerestore_cli.faces.retinaface import RetinaFaceR50

    torch.manual_seed(0)
    net = RetinaFaceR50()
    file = tmp_path / "detection_Resnet50_Final.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, file)
    del net
    det = build_detector("retinaface", weights_dir=tmp_path, threshold=0.5, min_face_size=0)
    images = [np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)]
    out = det.detect(images)
    assert isinstance(out, list) and len(out) == 2
    for faces in out:
        assert all(isinstance(f, Face) and f.landmarks.shape == (5, 2) for f in faces)
    # Direct path to the file works as well.
    assert len(build_detector("retinaface", weights_dir=file).detect(images[:1])) == 1


# --- alignment -------------------------------------------------------------------------------


def test_estimate_affine_recovers_a_similarity():
    template = face_template(512)
    angle, s, t = np.deg2rad(17.0), 0.37, np.array([140.0, 60.0])
    rot = s * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = template @ rot.T + t  # the template placed in an "image"
    affine = estimate_affine(landmarks, 512)
    mapped = landmarks @ affine[:, :2].T + affine[:, 2]
    np.testing.assert_allclose(mapped, template, atol=0.05)
    np.testing.assert_allclose(face_template(256), template / 2, rtol=1e-6)


def test_aligned_crop_puts_eyes_on_template(detector, photos, detections):
    """Detect again inside the aligned crop: the landmarks must land near the template."""
    name = "face-api.js/bbt3.jpg"
    affines = [estimate_affine(f.landmarks, 512) for f in detections[name][:2]]
    crops = warp_faces(photos[name], affines, 512)
    assert all(c.shape == (512, 512, 3) and c.dtype == np.uint8 for c in crops)
    for faces in detector.detect(crops):
        assert faces, "no face found in an aligned crop"
        err = np.linalg.norm(faces[0].landmarks - face_template(512), axis=1)
        assert err[:2].max() < 12 and err.max() < 20, err  # 512 px crop; eyes ~126 px apart


def test_scale_affine_matches_upscaled_image(photos, detections):
    name = "deepface_tests/couple.jpg"
    image = photos[name]
    affine = estimate_affine(detections[name][0].landmarks, 256)
    crop = warp_faces(image, [affine], 256)[0].astype(np.float32)
    up = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    crop_up = warp_faces(up, [scale_affine(affine, 2)], 256)[0].astype(np.float32)
    assert np.abs(crop_up - crop).mean() < 1.5


# --- paste-back -------------------------------------------------------------------------------


def test_paste_round_trip_is_local_and_faithful(photos, detections):
    name = "face-api.js/bbt4.jpg"
    image = photos[name]
    affines = [estimate_affine(f.landmarks, 512) for f in detections[name]]
    out = paste_faces(image, warp_faces(image, affines, 512), affines)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out is not image and not np.shares_memory(out, image)
    near = np.zeros(image.shape[:2], bool)
    for a in affines:
        near |= crop_footprint(a, 512, image.shape, margin=3.0)
    assert (out[~near] == image[~near]).all(), "pixels away from the faces changed"
    diff = np.abs(out.astype(np.int16) - image.astype(np.int16))
    assert diff[near].mean() < 3.0
    assert np.percentile(diff[near], 99) < 25


def test_paste_has_no_seam(photos, detections):
    """A brightened "restored" face: along the crop's edge the result is no sharper than inside."""
    for name in ("deepface_tests/couple.jpg", "face-api.js/bbt4.jpg"):
        image = photos[name]
        affine = estimate_affine(detections[name][0].landmarks, 512)
        crop = warp_faces(image, [affine], 512)[0]
        brighter = np.clip(crop.astype(np.int16) + 40, 0, 255).astype(np.uint8)
        out = paste_faces(image, [brighter], [affine])
        inv = cv2.invertAffineTransform(affine)
        square = cv2.warpAffine(np.ones((512, 512), np.uint8), inv, image.shape[1::-1], flags=cv2.INTER_NEAREST)
        kernel = np.ones((3, 3), np.uint8)
        edge = (cv2.dilate(square, kernel) - cv2.erode(square, kernel)) > 0
        weight = cv2.warpAffine(np.array(feather_mask(512)), inv, image.shape[1::-1])
        inside = weight > 0.99
        g = grad_mag(out)
        assert g[edge].mean() <= g[inside].mean(), name
        # Control: a hard paste of the same crop makes this measure fail, so it can see seams.
        hard = image.copy()
        hard[square > 0] = cv2.warpAffine(brighter, inv, image.shape[1::-1])[square > 0]
        assert grad_mag(hard)[edge].mean() > 2 * g[inside].mean(), name


def test_paste_faces_at_border_and_outside(shared_data):
    image = read_rgb(shared_data / PHOTOS / "deepface_tests/selfie-many-people.jpg")
    faces = build_detector("mtcnn").detect([image])[0]
    cut = [f for f in faces if f.box[0] < 0 or f.box[2] > image.shape[1]]
    assert cut, "expected a face cut by the frame in this photo"
    affines = [estimate_affine(f.landmarks, 512) for f in cut]
    off_image = np.array([[1, 0, 5000], [0, 1, 5000]], np.float32)  # crop far outside the image
    crops = warp_faces(image, affines + [off_image], 512)
    crops_const = warp_faces(image, affines, 512, border="constant")
    assert all(c.shape == (512, 512, 3) for c in crops + crops_const)
    grey = [255 - c for c in crops]
    out = paste_faces(image, grey, affines + [off_image])
    near = np.zeros(image.shape[:2], bool)
    for a in affines:
        near |= crop_footprint(a, 512, image.shape, margin=3.0)
    assert (out[~near] == image[~near]).all()
    assert (out[near] != image[near]).any()


def test_paste_rescales_crops_of_another_size(photos, detections):
    """Affines for 512 crops, restored crops at 256 (face_size says what the affines are for)."""
    name = "deepface_tests/couple.jpg"
    image = photos[name]
    affines = [estimate_affine(f.landmarks, 512) for f in detections[name]]
    small = warp_faces(image, [estimate_affine(f.landmarks, 256) for f in detections[name]], 256)
    out = paste_faces(image, small, affines, face_size=512)
    near = np.zeros(image.shape[:2], bool)
    for a in affines:
        near |= crop_footprint(a, 512, image.shape, margin=3.0)
    assert (out[~near] == image[~near]).all()
    assert np.abs(out.astype(np.int16) - image)[near].mean() < 3.0


def test_paste_on_upscaled_background(photos, detections):
    name = "deepface_tests/couple.jpg"
    image = photos[name]
    affines = [estimate_affine(f.landmarks, 512) for f in detections[name]]
    crops = warp_faces(image, affines, 512)
    up = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    out = paste_faces(up, crops, [scale_affine(a, 2) for a in affines])
    assert out.shape == up.shape
    near = np.zeros(up.shape[:2], bool)
    for a in affines:
        near |= crop_footprint(scale_affine(a, 2), 512, up.shape, margin=3.0)
    assert np.abs(out.astype(np.int16) - up)[near].mean() < 2.0


def test_paste_validates_inputs():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError):
        paste_faces(image, [np.zeros((32, 32, 3), np.uint8)], [])
    with pytest.raises(ValueError):
        paste_faces(image, [np.zeros((32, 16, 3), np.uint8)], [np.eye(2, 3, dtype=np.float32)])
