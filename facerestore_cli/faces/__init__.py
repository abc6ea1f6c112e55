"""Faces: detection with five landmarks, FFHQ alignment to square crops, seamless paste-back."""

from facerestore_cli.faces.align import FFHQ_TEMPLATE_512, estimate_affine, face_template, paste_faces, scale_affine, warp_faces
from facerestore_cli.faces.detector import build_detector
from facerestore_cli.faces.face import Detector, DetectorUnavailable, Face

__all__ = [
    "FFHQ_TEMPLATE_512",
    "Detector",
    "DetectorUnavailable",
    "Face",
    "build_detector",
    "estimate_affine",
    "face_template",
    "paste_faces",
    "scale_affine",
    "warp_faces",
]
