"""Acceptance check: full-size random checkpoints in the exact upstream layouts load and restore
one aligned face end to end (2 steps) within the memory limit (24 GB).

    python benchmarks/fullsize_check.py                       # all three presets, /tmp/fake_upstream
    python benchmarks/fullsize_check.py --files DIR --presets lrpo --steps 2 --threads 2

Writes the fake upstream files with ../shared/tools/fake_upstream.py into --files if any is absent
(about 9 GB; the tool skips files already there). Then, for each of --presets, in a subprocess of
its own (so each peak RSS is that preset's alone): `DiffBIRRestorer.from_files` with the preset's
own ControlNet file (diffbir_v1: v1_face.pth, diffusionreward: diffbir_refl.pt, lrpo:
lrpo_fidelity.pth), restores one 512 face (the first aligned 512x512 DiffBIR demo input under
../shared/data/real_lq, else a synthetic face) with --steps, and checks the output has the input's
shape, is finite and lies in [-1, 1]. Prints load time, restore time and peak RSS per preset and
exits non-zero if any preset fails or passes --limit-gb. The weights are random: this proves key
coverage, shapes, containers and memory at real size, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOOL = SHARED / "tools" / "fake_upstream.py"
FACE_DIRS = [SHARED / "data" / "real_lq" / "DiffBIR" / "inputs" / "demo" / "bfr" / "aligned"]
PRESET_CONTROLNET = {"diffbir_v1": "v1_face.pth", "diffusionreward": "diffbir_refl.pt", "lrpo": "lrpo_fidelity.pth"}
FILES = ["v2-1_512-ema-pruned.ckpt", "face_swinir_v1.ckpt", "v1_face.pth", "diffbir_refl.pt", "lrpo_fidelity.pth", "osediff_face.pkl"]


def peak_rss_gib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**30 if sys.platform == "darwin" else r / 2**20


def find_face() -> Path | None:
    """The first aligned 512x512 face among the shared demo inputs, or None."""
    from PIL import Image

    for d in FACE_DIRS:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                with Image.open(p) as im:
                    if im.size == (512, 512):
                        return p
    return None


def load_face(path: Path | None):
    """1x3x512x512 in [-1, 1]: the image at `path`, else a smooth synthetic face-like pattern."""
    import numpy as np
    import torch

    if path is not None:
        from PIL import Image

        arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 512), torch.linspace(-1, 1, 512), indexing="ij")
    skin = (xx**2 / 0.5 + yy**2 / 0.8 < 1).float()
    eyes = (((xx.abs() - 0.3) ** 2 + (yy + 0.2) ** 2) < 0.01).float()
    mouth = ((xx**2 / 0.1 + (yy - 0.45) ** 2 / 0.005) < 1).float()
    grey = 0.6 * skin - 0.8 * eyes - 0.5 * mouth - 0.3
    img = torch.stack([grey + 0.15, grey, grey - 0.1]).clamp(-1, 1)
    return img[None]


def run_one(args: argparse.Namespace) -> dict:
    """In the child: load one preset, restore one face, check it; a JSON-ready dict."""
    import torch

    from facerestore_cli.models.diffbir import DiffBIRRestorer

    torch.set_num_threads(args.threads)
    files = Path(args.files)
    face_path = find_face()
    x = load_face(face_path)
    t = time.perf_counter()
    model = DiffBIRRestorer.from_files(
        files / "v2-1_512-ema-pruned.ckpt",
        files / PRESET_CONTROLNET[args.one],
        files / "face_swinir_v1.ckpt",
        preset=args.one,
        device="cpu",
        dtype=torch.float32,
        cache_dir=args.cache_dir,
        steps=args.steps,
    )
    load_s = time.perf_counter() - t
    rss_load = peak_rss_gib()
    t = time.perf_counter()
    with torch.inference_mode():
        y = model(x)
    restore_s = time.perf_counter() - t
    finite = bool(torch.isfinite(y).all())
    lo, hi = float(y.min()), float(y.max())
    ok = tuple(y.shape) == tuple(x.shape) and finite and lo >= -1 and hi <= 1
    s = model.settings
    return {
        "preset": args.one,
        "controlnet": PRESET_CONTROLNET[args.one],
        "sampler": f"{s.sampler} {s.steps} steps, eta {s.eta}, seed {s.seed}",
        "face": str(face_path) if face_path else "synthetic",
        "load_s": round(load_s, 1),
        "restore_s": round(restore_s, 1),
        "peak_rss_after_load_gib": round(rss_load, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "shape": list(y.shape),
        "finite": finite,
        "min": round(lo, 4),
        "max": round(hi, 4),
        "std": round(float(y.std()), 4),
        "ok": ok,
    }


def ensure_files(files: Path) -> None:
    missing = [f for f in FILES if not (files / f).is_file()]
    if not missing:
        print(f"fake upstream files: all {len(FILES)} present in {files}", flush=True)
        return
    print(f"writing fake upstream files into {files} (missing: {', '.join(missing)}) ...", flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, str(TOOL), str(files)], check=True)
    print(f"written in {time.perf_counter() - t:.0f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=Path, default=Path("/tmp/fake_upstream"), help="upstream files folder [default: /tmp/fake_upstream]")
    ap.add_argument("--presets", default=",".join(PRESET_CONTROLNET), help="comma-separated presets [default: all three]")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--limit-gb", type=float, default=24.0, help="peak RSS limit per preset, GiB [default: 24]")
    ap.add_argument("--cache-dir", default=None, help="empty-prompt cache folder [default: none, the text tower runs every time]")
    ap.add_argument("--one", choices=list(PRESET_CONTROLNET), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0

    import torch

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESET_CONTROLNET]
    if unknown:
        ap.error(f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESET_CONTROLNET)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, fp32 cpu")
    ensure_files(args.files)
    failed = []
    for preset in presets:
        cmd = [sys.executable, __file__, "--one", preset, "--files", str(args.files), "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads)] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode != 0 or result is None:
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode}" + (" (likely out of memory)" if proc.returncode == -9 else "")
            else:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                why = lines[-1] if lines else f"exit {proc.returncode}"
            print(f"FAIL {preset}: {why} (after {wall:.0f} s)", flush=True)
            failed.append(preset)
            continue
        over = result["peak_rss_gib"] > args.limit_gb
        verdict = "PASS" if result["ok"] and not over else "FAIL"
        if verdict == "FAIL":
            failed.append(preset)
        print(
            f"{verdict} {preset}: {result['controlnet']}, {result['sampler']}: load {result['load_s']} s, "
            f"restore {result['restore_s']} s (subprocess wall {wall:.0f} s), peak RSS {result['peak_rss_gib']} GiB "
            f"(after load {result['peak_rss_after_load_gib']} GiB; limit {args.limit_gb:g}), output {result['shape']} "
            f"finite {result['finite']} in [{result['min']}, {result['max']}] std {result['std']}",
            flush=True,
        )
        print(f"  face: {result['face']}", flush=True)
    print("all presets passed" if not failed else f"FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
