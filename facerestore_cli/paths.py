"""Where the bundled weights are: the one table of default weight paths.

The repository's `weights/` for the editable install the README uses, or FACERESTORE_WEIGHTS
when set. Every default a command falls back to is named here and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR = Path(os.environ.get("FACERESTORE_WEIGHTS") or Path(__file__).resolve().parent.parent / "weights")

#: The default restorer of `restore`, `eval`, `frm-pairs` and the base of `refl`/`lrpo`.
DEFAULT_RESTORER = WEIGHTS_DIR / "restorer-tiny"
#: The default Face Reward Model of `score`, `refl`, `lrpo` and the `frm` metric.
DEFAULT_FRM = WEIGHTS_DIR / "frm-tiny"
#: NIQE's pristine model (the MATLAB release's parameters).
NIQE_PARAMS = WEIGHTS_DIR / "niqe" / "niqe_pris_params.npz"


def detector_weights(name: str) -> Path:
    """The bundled weights folder of face detector `name` (mtcnn, retinaface)."""
    return WEIGHTS_DIR / name
