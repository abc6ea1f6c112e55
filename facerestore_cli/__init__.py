"""facerestore: restore degraded faces with a one-step latent diffusion restorer."""

from pathlib import Path

__version__ = "0.1.0"

#: The repository's bundled weights (MTCNN detector, default restorer).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
