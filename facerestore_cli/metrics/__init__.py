"""Image-quality metrics behind one registry (in the manner of pyiqa's `create_metric`).

    from facerestore_cli.metrics import create_metric, available_metrics, unavailable_metrics
    psnr = create_metric("psnr")
    psnr(restored, ground_truth)          # uint8 RGB HxWx3 arrays -> float
    unavailable_metrics()                 # {"lpips": "LPIPS backbone weights missing: ...", ...}

| name | kind | better | what |
| --- | --- | --- | --- |
| `psnr` | full-reference | higher | PSNR (dB) on BT.601 luma, identical images capped at 100 dB |
| `ssim` | full-reference | higher | SSIM (Wang et al., Gaussian 11 / 1.5) on BT.601 luma |
| `identity` | full-reference | higher | cosine similarity of dlib face embeddings (needs the `eval` extra) |
| `identity_dist` | full-reference | lower | dlib's embedding distance (< 0.6: same person) |
| `lpips` | full-reference | lower | LPIPS (AlexNet), only when the lpips package and its backbone are on disk |
| `niqe` | no-reference | lower | NIQE with the MATLAB release's pristine model (`weights/niqe/`) |
| `frm` | no-reference | higher | the bundled Face Reward Model (`weights/frm-tiny/`) |
| `lrpo_reward` | full-reference | higher | LRPO's composite reward (FRM, fidelity, wavelet structure), what `lrpo` trains against |
| `pyiqa:<name>` | either | either | pyiqa's metrics, only when pyiqa and the weights are installed |

A metric that cannot run here is listed with a one-line reason; none ever downloads weights or
returns a made-up number.
"""

from facerestore_cli.metrics.base import EVAL_EXTRA, Metric, MetricInfo, MetricUnavailable, finite_mean
from facerestore_cli.metrics.registry import available_metrics, create_metric, list_metrics, metric_info, unavailable_metrics

__all__ = [
    "EVAL_EXTRA",
    "Metric",
    "MetricInfo",
    "MetricUnavailable",
    "available_metrics",
    "create_metric",
    "finite_mean",
    "list_metrics",
    "metric_info",
    "unavailable_metrics",
]
