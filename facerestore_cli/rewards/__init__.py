"""Reward models: judges of restored faces, used to score and to fine-tune restorers.

- `frm.py`: the Face Reward Model (config, scoring, save/load, upstream HPSv2 /
  FaceRewardModel.pth files); `backbones.py`: its compact CNN and open_clip (HPSv2) backbones
- `composite.py`: LRPO's composite reward (FRM, fidelity, quality, structure)
- `scoring.py`: FRM scores of image files (`facerestore score`)
- `metrics.py`: both as metrics of the registry (`frm`, `lrpo_reward`), registered on import

Preference pairs, the SVM labeller and the labelling page are data (`facerestore_cli.data`);
training the FRM is `facerestore_cli.train.frm`.
"""

from facerestore_cli.rewards import metrics as _registered_metrics  # noqa: F401  (adds frm, lrpo_reward to the metric registry)
from facerestore_cli.rewards.frm import FaceRewardModel, FrmConfig, load_frm

__all__ = ["FaceRewardModel", "FrmConfig", "load_frm"]
