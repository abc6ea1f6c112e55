"""facerestore: restore degraded faces with a one-step latent diffusion restorer."""

import os
from pathlib import Path

__version__ = "0.1.0"

#: The bundled weights (MTCNN detector, NIQE parameters, default restorer): the repository's
#: `weights/` for the editable install the README uses, or FACERESTORE_WEIGHTS when set.
WEIGHTS_DIR = Path(os.environ.get("FACERESTORE_WEIGHTS") or Path(__file__).resolve().parent.parent / "weights")
