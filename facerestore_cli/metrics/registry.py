"""The one registry of image-quality metrics: names, what each is, whether it can run here."""

from __future__ import annotations

import torch

from facerestore_cli.errors import InputError
from facerestore_cli.metrics.base import Metric, MetricInfo, MetricUnavailable
from facerestore_cli.metrics.classic import PSNR, SSIM
from facerestore_cli.metrics.external import (
    LPIPS,
    PYIQA_METRICS,
    PYIQA_PREFIX,
    PyiqaMetric,
    pyiqa_installed,
    pyiqa_unavailable_reason,
)
from facerestore_cli.metrics.identity import IdentityDistance, IdentitySimilarity
from facerestore_cli.metrics.niqe import NIQE

#: The project's own metrics, in the order tables show them. Parts above `metrics` add theirs
#: with `register_metric` (importing `facerestore_cli.rewards` adds `frm` and `lrpo_reward`), so
#: the registry itself depends on no model.
BUILTIN: dict[str, type[Metric]] = {m.name: m for m in (PSNR, SSIM, IdentitySimilarity, IdentityDistance, LPIPS, NIQE)}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Add a metric class to the registry under its `name` (a class decorator)."""
    BUILTIN[cls.name] = cls
    return cls


def list_metrics() -> list[str]:
    """Every metric name the registry knows, available here or not."""
    return list(BUILTIN) + [PYIQA_PREFIX + n for n in PYIQA_METRICS]


def _split(name: str) -> tuple[str, str | None]:
    key = name.strip().lower()
    if key.startswith(PYIQA_PREFIX):
        return key, key[len(PYIQA_PREFIX) :]
    return key, None


def metric_info(name: str) -> MetricInfo:
    """What `name` is and, if it cannot run here, why (no weights are loaded, except pyiqa's probe)."""
    key, pyiqa_name = _split(name)
    if key in BUILTIN:
        return BUILTIN[key].info()
    if pyiqa_name is not None:
        spec = PYIQA_METRICS.get(pyiqa_name)
        reason = pyiqa_unavailable_reason(pyiqa_name)
        if spec is None and reason is None:
            m = PyiqaMetric(pyiqa_name)
            return MetricInfo(m.name, m.full_reference, m.lower_better, m.description)
        if spec is None:
            return MetricInfo(key, False, False, f"pyiqa {pyiqa_name}", reason)
        return MetricInfo(key, spec.full_reference, spec.lower_better, spec.description + " (via pyiqa)", reason)
    raise InputError(f"unknown metric {name!r}; known: {', '.join(list_metrics())} (or pyiqa:<name> with pyiqa installed)")


def available_metrics() -> list[str]:
    """Names of the metrics that can run here."""
    return [n for n in list_metrics() if _available(n)]


def unavailable_metrics() -> dict[str, str]:
    """Name -> one-line reason, for every registered metric that cannot run here."""
    return {n: r for n in list_metrics() if (r := metric_info(n).unavailable_reason)}


def _available(name: str) -> bool:
    key, pyiqa_name = _split(name)
    if pyiqa_name is not None and not pyiqa_installed():
        return False
    return metric_info(key).available


def create_metric(name: str, device: str | torch.device = "cpu") -> Metric:
    """A ready metric; MetricUnavailable (one-line reason) if it cannot run here, ValueError if unknown."""
    info = metric_info(name)
    if info.unavailable_reason:
        raise MetricUnavailable(f"{info.name}: {info.unavailable_reason}")
    key, pyiqa_name = _split(name)
    if pyiqa_name is not None:
        return PyiqaMetric(pyiqa_name, device)
    cls = BUILTIN[key]
    if cls is LPIPS:
        return LPIPS(device)
    return cls()
