"""The Face Reward Model (FRM) and its annotations: a learned judge of restored faces.

- `frm.py`: the model (config, scoring, save/load, upstream HPSv2 / FaceRewardModel.pth files)
- `backbones.py`: the compact CNN trained here and the open_clip (HPSv2 layout) backbone
- `annotations.py`: the pairs format, importing and validating human labels
- `autopairs.py`: automatic pairs (ground truth > restored > degraded, milder > stronger)
- `svm.py`: the hybrid pipeline, an SVM trained on human labels labels the rest
- `frm_training.py`: Bradley-Terry training with validation, checkpoints and resume
- `labelling/`: the local page that shows two faces and records which is better
"""

from .frm import FaceRewardModel, FrmConfig, load_frm

__all__ = ["FaceRewardModel", "FrmConfig", "load_frm"]
