"""Load time, speed and memory of the published face pipelines (DiffBIR v1 family, OSEDiff) at real size.

    python benchmarks/bench_published.py --files /tmp/fake_upstream --kind diffbir --per-step --batches 1,8 --threads 2
    python benchmarks/bench_published.py --files weights/upstream --device cuda --precision fp16 --steps 50,20,10 --batches 1,8 --repeats 3

--files is a folder with the upstream files (real ones, or the full-size random ones that
../shared/tools/fake_upstream.py writes): v2-1_512-ema-pruned.ckpt, face_swinir_v1.ckpt, and the
ControlNet of --preset (v1_face.pth for diffbir_v1, diffbir_refl.pt for diffusionreward,
lrpo_fidelity.pth for lrpo); osediff_face.pkl for --kind osediff. Each model is loaded once (timed,
including the empty-prompt encoding on a --cache-dir miss), then timed per face on random faces
Bx3x512x512 in [-1, 1] at each of --batches.

Full mode: the whole restore at each of --steps: median of --repeats calls after --warmup calls.
--per-step (for CPUs, where 50 steps at batch 8 take hours): at each batch size the fixed part
(stage 1 + VAE encode + VAE decode + colour fix) and one sampling step (ControlNet + UNet +
scheduler) are timed separately, and the per-face time for each of --steps is then DERIVED as
(fixed + N x step) / batch. Derived rows say "derived: fixed + N x step" in their `what` column;
every other number is measured.

Memory: peak RSS is the process's ru_maxrss so far (it only grows, so with batches in rising order
each row's value is that batch's peak); on CUDA also the peak allocated GPU memory of that setting.
Before each batch its working memory is predicted from the smaller batches already run; a batch
whose prediction exceeds 90 % of MemAvailable is skipped with a line saying so (a CPU process that runs out of
memory would be killed, not raise). --max-memory GB also caps the address space (RLIMIT_AS), so an
allocation beyond it fails as an error row instead.

Prints one Markdown row per measurement, in the columns of benchmarks/RESULTS.md
(date | machine | settings | what | result).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

PRESET_CONTROLNET = {"diffbir_v1": "v1_face.pth", "diffusionreward": "diffbir_refl.pt", "lrpo": "lrpo_fidelity.pth"}
SD_FILE = "v2-1_512-ema-pruned.ckpt"
SWINIR_FILE = "face_swinir_v1.ckpt"
OSEDIFF_FILE = "osediff_face.pkl"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIZE = 512


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    mem = _meminfo().get("MemTotal", 0) / 2**20
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {gpu}, torch {torch.__version__}"


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (empty where there is none)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if len(line.split()) >= 2}


def peak_rss_gib() -> float:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**30 if sys.platform == "darwin" else r / 2**20


def rss_gib() -> float:
    """The current resident set (VmRSS), GiB; 0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers, e.g. 1,8")
    return values


def row(settings: str, what: str, result: str, where: str) -> str:
    """One row in the columns of benchmarks/RESULTS.md."""
    return f"| {datetime.date.today().isoformat()} | {where} | {settings} | {what} | {result} |"


class Bench:
    """The shared state of one run: where, how, and the memory seen so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[args.precision]
        self.where = machine()
        self.warmup = args.warmup if args.warmup is not None else (1 if self.device.type == "cuda" else 0)
        self.base_rss = 0.0  # RSS after loading, GiB
        self.extra_per_face: float | None = None  # GiB of working memory per face, from the batches run

    def print(self, settings: str, what: str, result: str) -> None:
        print(row(settings, what, result, self.where), flush=True)

    def note(self, text: str) -> None:
        print(f"<!-- {text} -->", flush=True)

    def faces(self, batch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(batch)
        return (torch.rand(batch, 3, SIZE, SIZE, generator=gen) * 2 - 1).to(self.device, self.dtype)

    def memory(self) -> str:
        out = f"peak RSS {peak_rss_gib():.2f} GiB"
        if self.device.type == "cuda":
            out += f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        return out

    def reset_gpu_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def fits(self, batch: int) -> str | None:
        """None when `batch` is predicted to fit in the memory available now, else why not (CPU only)."""
        if self.device.type != "cpu" or self.extra_per_face is None:
            return None
        avail = _meminfo().get("MemAvailable", 0) / 2**20
        if not avail:
            return None
        need = self.extra_per_face * batch  # working memory over the resident model
        if need > 0.9 * avail:
            return (
                f"skipped: batch {batch} predicted to need ~{need:.1f} GiB of working memory "
                f"({self.extra_per_face:.2f} GiB/face over the resident model), {avail:.1f} GiB available"
            )
        return None

    def learn(self, batch: int) -> None:
        """Working memory per face: the peak of the batch just run over the RSS now (its tensors
        freed, the weights paged in); peaks only grow, so an overestimate for later batches."""
        per = max(0.0, peak_rss_gib() - rss_gib()) / batch
        self.extra_per_face = per if self.extra_per_face is None else max(self.extra_per_face, per)

    def timed(self, fn, repeats: int, warmup: int | None = None) -> list[float]:
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        times = []
        for _ in range(repeats):
            _sync(self.device)
            t = time.perf_counter()
            fn()
            _sync(self.device)
            times.append(time.perf_counter() - t)
        return times


# ------------------------------------------------------------------------------ DiffBIR
def load_diffbir(b: Bench):
    from facerestore_cli.models.diffbir import DiffBIRRestorer

    a = b.args
    files = Path(a.files)
    cn = files / PRESET_CONTROLNET[a.preset]
    need = [files / SD_FILE, cn, files / SWINIR_FILE]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    cache_hit = Path(a.cache_dir).is_dir() and any(Path(a.cache_dir).glob("sd21_empty_prompt_*.safetensors"))
    t = time.perf_counter()
    model = DiffBIRRestorer.from_files(
        files / SD_FILE, cn, files / SWINIR_FILE, preset=a.preset, device=b.device, dtype=b.dtype, cache_dir=a.cache_dir
    )
    _sync(b.device)
    seconds = time.perf_counter() - t
    return model, seconds, ("hit" if cache_hit else "miss (text tower run)")


@torch.inference_mode()
def bench_diffbir(b: Bench) -> None:
    a = b.args
    b.reset_gpu_peak()
    model, load_s, cache = load_diffbir(b)
    b.base_rss = rss_gib()
    s = model.settings
    settings = (
        f"DiffBIR {a.preset} ({s.sampler}, eta {s.eta}), files {Path(a.files).name}, {a.precision}, "
        f"{b.device.type}, {a.threads} threads, {SIZE} px"
    )
    b.print(settings, "load (from_files, once)", f"{load_s:.1f} s, prompt cache {cache}, RSS after load {b.base_rss:.2f} GiB, {b.memory()}")
    if a.per_step:
        per_step_diffbir(b, model, settings)
    else:
        full_diffbir(b, model, settings)
    del model


def full_diffbir(b: Bench, model, settings: str) -> None:
    a = b.args
    for batch in sorted(a.batches):
        why = b.fits(batch)
        if why:
            b.print(settings, f"whole restore, batch {batch}", why)
            continue
        x = b.faces(batch)
        for steps in a.steps:
            model.steps = steps
            b.reset_gpu_peak()
            try:
                times = b.timed(lambda x=x: model(x), a.repeats)
            except (RuntimeError, MemoryError) as err:
                b.print(settings, f"whole restore, {steps} steps, batch {batch}", f"FAILED: {str(err).splitlines()[0][:160]}")
                return
            per = statistics.median(times) / batch
            b.learn(batch)
            b.print(
                f"{settings}, median of {a.repeats}, warm-up {b.warmup}",
                f"measured: whole restore, {steps} steps, batch {batch}",
                f"{per:.2f} s/face ({batch / statistics.median(times):.3f} faces/s), {b.memory()}",
            )


def _step_parts(b: Bench, model, batch: int) -> tuple[dict[str, float], float, float, list[float]]:
    """At one batch size: median seconds of each fixed part, of one sampling step, and of the first step."""
    from facerestore_cli.models.color import color_fix
    from facerestore_cli.models.diffbir import COLOR_FIX, make_scheduler

    reps = b.args.repeats
    x = b.faces(batch)
    parts: dict[str, float] = {}
    out: dict[str, torch.Tensor] = {}

    def part(name: str, fn) -> None:
        parts[name] = statistics.median(b.timed(fn, reps))

    part("stage 1", lambda: out.__setitem__("cond", model.stage1_image(x)))
    part("VAE encode", lambda: out.__setitem__("c", model.encode_condition(out["cond"])))
    gen = torch.Generator("cpu").manual_seed(model.seed)
    z = model.initial_noise(out["c"], gen)
    sched = make_scheduler(model.settings, model.scheduler_config)
    context = model.prompt_embeds.to(model.dtype).expand(batch, -1, -1)
    extra = {"eta": model.eta} if model.sampler == "ddim" else {}
    ts = list(sched.timesteps)
    done = [0]

    def one_step() -> None:
        t = ts[done[0] % len(ts)]
        done[0] += 1
        eps = model.predict_noise(z, out["c"], t, context)
        sched.step(eps.float(), t, z, generator=gen, return_dict=False, **extra)

    # one untimed-for-the-median first step (shown on its own), then the median of --repeats steps
    first = b.timed(one_step, 1, warmup=0)[0]
    steps = b.timed(one_step, b.args.step_repeats or reps, warmup=0)
    step = statistics.median(steps)
    part("VAE decode", lambda: out.__setitem__("out", model.decode(z)))
    part("colour fix", lambda: color_fix(out["out"], out["cond"], COLOR_FIX))
    return parts, step, first, steps


def per_step_diffbir(b: Bench, model, settings: str) -> None:
    a = b.args
    s_rep = f"{settings}, median of {a.repeats} (steps: of {a.step_repeats or a.repeats} after a first), warm-up {b.warmup}"
    for batch in sorted(a.batches):
        why = b.fits(batch)
        if why:
            b.print(settings, f"per step, batch {batch}", why)
            continue
        b.reset_gpu_peak()
        try:
            parts, step, first, steps_s = _step_parts(b, model, batch)
        except (RuntimeError, MemoryError) as err:
            b.print(settings, f"per step, batch {batch}", f"FAILED: {str(err).splitlines()[0][:160]}")
            return
        b.learn(batch)
        fixed = sum(parts.values())
        detail = ", ".join(f"{k} {v / batch:.2f}" for k, v in parts.items())
        b.print(
            s_rep,
            f"measured: fixed part (stage 1 + VAE encode + VAE decode + colour fix), batch {batch}",
            f"{fixed / batch:.2f} s/face ({detail} s/face), {b.memory()}",
        )
        b.print(
            s_rep,
            f"measured: one sampling step (ControlNet + UNet + scheduler), batch {batch}",
            f"{step / batch:.2f} s/face per step (median of {len(steps_s)}: "
            f"{', '.join(f'{t / batch:.2f}' for t in steps_s)}; first step {first / batch:.2f}), {b.memory()}",
        )
        for steps in a.steps:
            per = (fixed + steps * step) / batch
            b.print(
                s_rep,
                f"derived: fixed + {steps} x step, batch {batch} (not run)",
                f"~{per:.1f} s/face (~{per / 60:.1f} min/face, ~{batch / per:.4f} faces/s)",
            )


# ------------------------------------------------------------------------------ OSEDiff
def find_osediff_loader():
    """`load_osediff` from models.upstream or models.osediff, or None."""
    for mod in ("facerestore_cli.models.upstream", "facerestore_cli.models.osediff"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        fn = getattr(m, "load_osediff", None)
        if fn is not None:
            return fn, mod
    return None, None


@torch.inference_mode()
def bench_osediff(b: Bench) -> None:
    a = b.args
    settings = f"OSEDiff, files {Path(a.files).name}, {a.precision}, {b.device.type}, {a.threads} threads, {SIZE} px"
    loader, where = find_osediff_loader()
    if loader is None:
        b.print(settings, "load", "skipped: no loader (no load_osediff in facerestore_cli.models.upstream or .osediff)")
        return
    files = Path(a.files)
    need = [files / SD_FILE, files / OSEDIFF_FILE]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        b.print(settings, "load", f"skipped: missing {', '.join(missing)}")
        return
    b.reset_gpu_peak()
    t = time.perf_counter()
    try:
        kwargs = {"device": b.device, "dtype": b.dtype}
        if "cache_dir" in inspect.signature(loader).parameters:
            kwargs["cache_dir"] = a.cache_dir
        model = loader(files / SD_FILE, files / OSEDIFF_FILE, **kwargs)
    except Exception as err:  # noqa: BLE001 - a benchmark reports, it does not stop
        b.print(settings, f"load ({where}.load_osediff)", f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return
    _sync(b.device)
    load_s = time.perf_counter() - t
    b.base_rss = rss_gib()
    b.extra_per_face = None
    b.print(settings, f"load ({where}.load_osediff, once)", f"{load_s:.1f} s, RSS after load {b.base_rss:.2f} GiB, {b.memory()}")
    for batch in sorted(a.batches):
        why = b.fits(batch)
        if why:
            b.print(settings, f"one step restore, batch {batch}", why)
            continue
        x = b.faces(batch)
        b.reset_gpu_peak()
        try:
            times = b.timed(lambda x=x: model(x), a.repeats)
        except (RuntimeError, MemoryError) as err:
            b.print(settings, f"one step restore, batch {batch}", f"FAILED: {str(err).splitlines()[0][:160]}")
            return
        b.learn(batch)
        per = statistics.median(times) / batch
        b.print(
            f"{settings}, median of {a.repeats}, warm-up {b.warmup}",
            f"measured: one-step restore, batch {batch}",
            f"{per:.2f} s/face ({1 / per:.3f} faces/s), {b.memory()}",
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=Path, required=True, help="folder with the upstream files (real or fake_upstream.py's)")
    ap.add_argument("--kind", choices=["diffbir", "osediff", "all"], default="all")
    ap.add_argument("--preset", choices=list(PRESET_CONTROLNET), default="diffbir_v1", help="DiffBIR preset [default: diffbir_v1]")
    ap.add_argument("--steps", type=_ints, default=[50, 20, 10], help="DiffBIR sampling steps [default: 50,20,10]")
    ap.add_argument("--batches", "--batch-sizes", type=_ints, default=[1, 8], help="batch sizes [default: 1,8]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=list(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per setting, median [default: 1 on a CPU, 3 on CUDA]")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls before each setting [default: 0 on a CPU, 1 on CUDA]")
    ap.add_argument("--step-repeats", type=int, default=None, help="--per-step: timed steps after the first (median) [default: --repeats]")
    ap.add_argument("--per-step", action="store_true", help="time the fixed part and one step; derive the N-step times")
    ap.add_argument("--cache-dir", default="/tmp/facerestore_bench_cache", help="empty-prompt cache folder")
    ap.add_argument("--max-memory", type=float, default=None, help="cap the address space at this many GiB (RLIMIT_AS)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.max_memory:
        cap = int(args.max_memory * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    b = Bench(args)
    if args.repeats is None:
        args.repeats = 3 if b.device.type == "cuda" else 1
    print(f"machine: {b.where}")
    print(f"command: {' '.join(sys.argv)}")
    print("| date | machine | settings | what | result |\n| --- | --- | --- | --- | --- |", flush=True)
    if args.kind in ("diffbir", "all"):
        try:
            bench_diffbir(b)
        except Exception as err:  # noqa: BLE001
            b.print(f"DiffBIR {args.preset}", "load", f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
    if args.kind in ("osediff", "all"):
        bench_osediff(b)
    print(f"final: {b.memory()}", flush=True)


if __name__ == "__main__":
    main()
