"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The project's shared data folder, a sibling of the repository (never committed into it).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when that folder is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (see shared/data/README.md)")
    return SHARED_DATA


def _torch_threads(n: int):
    """torch's intra-op thread count set to n, and the previous count put back afterwards."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and an earlier test may have raised torch's count."""
    yield from _torch_threads(1)


@pytest.fixture(scope="module")
def two_threads():
    """The bundled model and real training steps on both cores of the CI machine, for a module;
    the count before it is restored, so later modules run as they would alone."""
    yield from _torch_threads(2)


@pytest.fixture
def tiny_published_configs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The loader builds the published architectures (SD 2.1, SwinIR); tests' files in those
    layouts are tiny, so the shipped configs are swapped for theirs, and the store is fresh."""
    from test_swinir import TINY as TINY_SWINIR
    from upstream_fakes import TINY_SD

    from facerestore_cli.models import sd21, swinir

    shipped = sd21.sd21_configs()
    monkeypatch.setattr(sd21, "sd21_configs", lambda: {**shipped, **{k: dict(v) for k, v in TINY_SD.items()}})
    monkeypatch.setattr(swinir, "FACE_SWINIR_V1", TINY_SWINIR)
    monkeypatch.setenv("FACERESTORE_HOME", str(tmp_path / "home"))
