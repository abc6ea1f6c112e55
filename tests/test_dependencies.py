"""What `pip install -e .` gives: one OpenCV. Each OpenCV wheel installs the same `cv2` package, so
with two of them whichever was installed last wins (facexlib, a dependency until 2026-12, pulled
`opencv-python` beside our `opencv-python-headless`)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

OPENCV = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_exactly_one_opencv_distribution_is_installed() -> None:
    installed = sorted({(d.metadata["Name"] or "").lower() for d in metadata.distributions()} & OPENCV)
    assert installed == ["opencv-python-headless"], (
        f"OpenCV wheels installed: {installed}; all provide cv2. In an older venv: "
        "pip uninstall -y facexlib opencv-python && pip install --force-reinstall --no-deps opencv-python-headless"
    )


def test_no_declared_dependency_is_facexlib() -> None:
    """facexlib requires opencv-python (and numba, filterpy); RetinaFace is our own network now."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    assert not [r for r in declared if r.lower().startswith("facexlib")]
    assert [r for r in project["dependencies"] if r.startswith("opencv-python-headless")]
