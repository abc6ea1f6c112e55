"""The `--color-fix` values and their parsing; the fixes themselves, and what each value means,
are in color.py. Parsing needs no torch, so a command checks the option before it imports the
model stack."""

from __future__ import annotations

from facerestore_cli.errors import InputError

COLOR_FIXES = ("wavelet", "adain", "none")
#: wavelet by default: on held-out faces it beat adain and no fix on PSNR, SSIM, identity and
#: NIQE (benchmarks/RESULTS.md).
DEFAULT_COLOR_FIX = "wavelet"
#: detail bands the restorer supplies under plain "wavelet" (color.py's docstring).
DEFAULT_WAVELET_LEVELS = 3
MAX_WAVELET_LEVELS = 8
#: `--color-fix auto`: the model's own choice (`default_color_fix`), else DEFAULT_COLOR_FIX.
AUTO_COLOR_FIX = "auto"


def parse_color_fix(spec: str) -> tuple[str, int]:
    """ "wavelet", "wavelet:N", "adain" or "none" -> (method, wavelet levels); ValueError saying what is allowed."""
    method, _, levels = spec.partition(":")
    allowed = f"color fix must be one of {', '.join(COLOR_FIXES)} or wavelet:N (N = 1..{MAX_WAVELET_LEVELS}), not {spec!r}"
    if method not in COLOR_FIXES or (levels and method != "wavelet"):
        raise InputError(allowed)
    if not levels:
        return method, DEFAULT_WAVELET_LEVELS
    if not levels.isdigit() or not 1 <= int(levels) <= MAX_WAVELET_LEVELS:
        raise InputError(allowed)
    return method, int(levels)


def parse_color_fix_choice(spec: str) -> str:
    """A `--color-fix` value: "auto" or a spec `parse_color_fix` accepts (InputError otherwise)."""
    if spec != AUTO_COLOR_FIX:
        parse_color_fix(spec)
    return spec


def color_fix_for(model: object, choice: str) -> str:
    """The colour fix to run after `model`: `choice`, or for "auto" the model's `default_color_fix`
    (a multi-step DiffBIR model fixes its colours itself against its stage-1 output)."""
    if choice == AUTO_COLOR_FIX:
        return getattr(model, "default_color_fix", DEFAULT_COLOR_FIX)
    return choice
