"""Face Reward Model commands: `frm-pairs`, `frm-import`, `frm-annotate`, `label`, `train-frm`,
`frm-eval` and `score`. Option parsing and printing only; the work is in `facerestore_cli.rewards`."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click
from rich.table import Table

from facerestore_cli.commands.ui import (
    checked,
    console,
    device_option,
    fail,
    load_run_config,
    print_run_end,
    print_run_summary,
    progress_bar,
    run_device,
    run_options,
    secondary_process,
    user_errors,
)
from facerestore_cli.errors import InputError


def _error_line(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


def _gamma(value: str) -> str | float:
    """--gamma: scale, auto or a number, as scikit-learn's SVC takes it."""
    if value in ("scale", "auto"):
        return value
    try:
        return float(value)
    except ValueError:
        raise InputError(f"{value!r} is not scale, auto or a number") from None


# ------------------------------------------------------------------ automatic pairs
@click.command("frm-pairs")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Folder for images/, pairs.jsonl, candidates.jsonl."
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Degradation ranges (a [degradation] table, e.g. configs/train_tiny.toml).",
)
@click.option(
    "--levels",
    default="0.25,0.5,1.0",
    show_default=True,
    help="Degradation strengths in (0, 1]: each is a milder copy of the drawn degradation.",
)
@click.option("--size", type=click.IntRange(16), default=160, show_default=True, help="Stored image size (the FRM input size or larger).")
@click.option(
    "--work-size",
    type=click.IntRange(16),
    default=256,
    show_default=True,
    help="Size the degradation levels are made at (parameters are for 512 px).",
)
@click.option(
    "--restore-limit",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Restore this many faces (spread over SRC) for ground truth > restored > degraded pairs.",
)
@click.option("--restorer", type=click.Path(path_type=Path), default=None, help="Restorer folder [default: bundled weights/restorer-tiny].")
@click.option("--no-candidates", is_flag=True, help="Do not write unlabelled candidate pairs for the labelling page / SVM.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N faces.")
@device_option()
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue an interrupted run in OUTPUT (same options).")
def frm_pairs(
    src, outdir, config_path, levels, size, work_size, restore_limit, restorer, no_candidates, seed, limit, device, resume
) -> None:
    """Make automatic FRM training pairs from aligned ground-truth faces in SRC.

    \b
    Example:
      facerestore frm-pairs data/train_faces -o data/frm_train --config configs/train_tiny.toml --restore-limit 600
    """
    import torch

    from facerestore_cli.data.autopairs import (
        AutoPairsConfig,
        check_out_dir,
        make_auto_pairs,
    )
    from facerestore_cli.data.degrade import DegradationConfig
    from facerestore_cli.data.testsets import (
        load_degradation_config,
        source_images,
    )
    from facerestore_cli.models.loading import load_restorer

    with user_errors():
        check_out_dir(outdir)
        cfg = AutoPairsConfig(
            size=size,
            work_size=work_size,
            levels=_floats(levels),
            restore_limit=restore_limit,
            candidates=not no_candidates,
            seed=seed,
            degradation=load_degradation_config(config_path) if config_path else DegradationConfig(),
        )
        model = load_restorer(restorer, None, run_device(device), torch.float32) if restore_limit else None
        total = len(source_images(src))
        with progress_bar() as progress:
            task = progress.add_task("faces", total=min(total, limit or total))
            summary = make_auto_pairs(src, outdir, cfg, model, limit, on_face=lambda _: progress.advance(task), resume=resume)
    for name in summary.unreadable:
        _error_line(f"{Path(src) / name}: unreadable image, skipped")
    rows = {
        "faces": summary.faces,
        "restored": summary.restored,
        "pairs": summary.pairs,
        "candidates": summary.candidates,
        "time": f"{summary.seconds:.1f} s",
    }
    print_run_summary("frm-pairs summary", rows)
    console.print(f"pairs: {outdir / 'pairs.jsonl'}; unlabelled candidates: {outdir / 'candidates.jsonl'}")
    if summary.unreadable:
        sys.exit(1)


# ------------------------------------------------------------------ training
def _val_line(step: int, val) -> str:
    kinds = ", ".join(f"{k} {acc:.3f}" for k, (acc, _) in val.by_kind.items())
    return f"step {step}: validation pairwise accuracy {val.accuracy:.4f} on {val.pairs} pairs, loss {val.loss:.4f} ({kinds})"


@click.command("train-frm")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="FRM training config (TOML/JSON), e.g. configs/train_frm.toml.",
)
@run_options("Run folder: checkpoint/, log.jsonl, final/.")
@click.option(
    "--pairs",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Pair files (override the config's `pairs`).",
)
def train_frm_cmd(config_path, run_dir, pairs, steps, device, resume, max_minutes) -> None:
    """Train the Face Reward Model on preference pairs (Bradley-Terry loss).

    \b
    Example:
      facerestore frm-pairs data/train_faces -o data/frm_train --config configs/train_tiny.toml --restore-limit 600
      facerestore train-frm --config configs/train_frm.toml --out runs/frm
    """
    from facerestore_cli.train.frm import FrmTrainConfig, train_frm

    cfg = load_run_config(FrmTrainConfig, config_path, steps, "pairs", pairs, "no pair files: give --pairs or set `pairs` in the config")
    dev = run_device(device)
    if secondary_process():
        with user_errors():
            train_frm(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes)
        return
    with user_errors():
        with progress_bar() as progress:
            task = progress.add_task("training", total=cfg.steps)

            def on_step(step: int, terms: dict[str, float]) -> None:
                progress.update(task, completed=step, description=f"training loss {terms['loss']:.4f} acc {terms['train_accuracy']:.3f}")

            def on_val(step: int, val) -> None:
                progress.console.print(_val_line(step, val), highlight=False, soft_wrap=True)

            result = train_frm(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes, on_step=on_step, on_val=on_val)
    extra = result.extra
    for err in extra["row_errors"]:
        _error_line(f"{err} (row skipped)")
    for path, reason in extra["unreadable"].items():
        _error_line(f"{path}: {reason} (pair skipped)")
    rows = {
        "step": f"{result.step} / {cfg.steps}",
        "steps this run": result.steps_this_run,
        "train pairs": extra["train_pairs"],
        "validation pairs": extra["val_pairs"],
        "last loss": f"{result.last_losses.get('loss', float('nan')):.4f}",
        "time": f"{result.seconds:.1f} s",
        "pairs per second": extra["pairs_per_s"],
    }
    if extra["val"] is not None:
        rows["validation accuracy"] = f"{extra['val'].accuracy:.4f}"
        rows.update({f"  {k}": f"{acc:.4f} ({n})" for k, (acc, n) in extra["val"].by_kind.items()})
    print_run_summary("train-frm summary", rows)
    print_run_end(result.finished, result.step, [f"final model: {run_dir / 'final'} (use it with `facerestore score --model`)"])
    if extra["row_errors"] or extra["unreadable"]:
        sys.exit(1)


def _load_model(model: Path | None, device: str, clip: str):
    from facerestore_cli.paths import DEFAULT_FRM
    from facerestore_cli.rewards.frm import load_frm

    with user_errors():
        return load_frm(model or DEFAULT_FRM, run_device(device), clip=_clip_spec(clip))


def _clip_spec(value: str):
    """--clip: an open_clip model name, or a JSON file with the architecture (embed_dim, vision_cfg, text_cfg)."""
    if value.lower().endswith(".json"):
        try:
            return json.loads(Path(value).read_text())
        except (OSError, json.JSONDecodeError) as err:
            fail(f"--clip {value}: cannot read an open_clip config ({err})")
    return value


_MODEL_HELP = "FRM folder, an upstream HPSv2 / FaceRewardModel.pth checkpoint, or `face-reward-model` once imported (`facerestore models`) [default: bundled weights/frm-tiny]."


@click.command("frm-eval")
@click.argument("pair_files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), default=None, help=_MODEL_HELP)
@click.option(
    "--clip", default="ViT-H-14", show_default=True, help="open_clip architecture of an upstream checkpoint: a model name or a JSON file."
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the results as JSON.")
@device_option()
def frm_eval(pair_files, model, clip, json_path, device) -> None:
    """Pairwise accuracy of an FRM on labelled pairs (e.g. held-out faces from `frm-pairs`).

    \b
    Example:
      facerestore frm-pairs data/val_faces -o data/frm_val --config configs/train_tiny.toml --restore-limit 100 --seed 123
      facerestore frm-eval data/frm_val/pairs.jsonl
    """
    from facerestore_cli.data.annotations import load_pair_files
    from facerestore_cli.train.frm import evaluate_pairs

    frm = _load_model(model, device, clip)
    with user_errors():
        pairs, errors = load_pair_files(pair_files)
    for err in errors:
        _error_line(f"{err} (row skipped)")
    result = evaluate_pairs(frm, pairs)
    for path, reason in result.unreadable.items():
        _error_line(f"{path}: {reason} (pairs skipped)")
    table = Table(title="FRM pairwise accuracy")
    for col in ("pairs", "accuracy", "n"):
        table.add_column(col, justify="left" if col == "pairs" else "right")
    table.add_row("all", f"{result.accuracy:.4f}", str(result.pairs))
    for kind, (acc, n) in result.by_kind.items():
        table.add_row(kind, f"{acc:.4f}", str(n))
    console.print(table)
    if result.ranking_faces:
        console.print(f"ground truth > restored > degraded on {result.ranking_correct:.1%} of {result.ranking_faces} faces")
    if result.mean_scores:
        console.print("mean score: " + ", ".join(f"{k} {v:.4f}" for k, v in result.mean_scores.items()), highlight=False)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if errors or result.unreadable:
        sys.exit(1)


# ------------------------------------------------------------------ scoring
@click.command("score")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", type=click.Path(path_type=Path), default=None, help=_MODEL_HELP)
@click.option(
    "--clip", default="ViT-H-14", show_default=True, help="open_clip architecture of an upstream checkpoint: a model name or a JSON file."
)
@click.option("--caption", default=None, help="Caption for caption-conditioned models (HPSv2-style FRMs).")
@click.option("--detect", is_flag=True, help="Inputs are photos: detect and align faces first (score = mean over faces).")
@click.option(
    "--aligned-ok",
    is_flag=True,
    help="Inputs are aligned face crops: skip the detector pass that checks each square input has its face where an aligned crop does (non-square inputs are still warned about).",
)
@click.option("--sort", is_flag=True, help="Print best first.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the scores as JSON.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@device_option()
def score_cmd(inputs, model, clip, caption, detect, aligned_ok, sort, json_path, batch_size, device) -> None:
    """Print the FRM score (higher is better) of each aligned face in INPUTS (files, folders, globs).

    Without --detect each input must be an aligned face crop (FFHQ layout, as `restore
    --save-faces` and `prepare-data` write them); one that is not square, or whose face the
    detector does not find where an aligned crop has it, is still scored but gets a warning line:
    its score is not a face's.

    \b
    Example (pick the best of several restorations of one face):
      facerestore score restored_a/face.png restored_b/face.png --sort
    """
    from rich.markup import escape

    from facerestore_cli.io.inputs import discover_inputs
    from facerestore_cli.rewards.scoring import score_paths

    frm = _load_model(model, device, clip)
    from facerestore_cli.faces.detector import build_detector
    from facerestore_cli.faces.face import DetectorUnavailable

    detector = None
    if detect or not aligned_ok:
        try:
            detector = build_detector("mtcnn", device=frm.device)
        except DetectorUnavailable:
            if detect:
                raise
            # it only checks the crops: without its weights, only their shape is checked
    items, errors = discover_inputs(list(inputs))
    finder, checker = (detector, None) if detect else (None, detector)
    scores, bad = score_paths(frm, [i.path for i in items], caption, finder, batch_size, checker=checker)
    errors += bad
    for err in errors:
        _error_line(str(err))
    for s in scores:
        if s.warning:
            console.print(
                f"[yellow]warning:[/yellow] {escape(str(s.path))}: {escape(s.warning)}; its score is not a face's (--detect scores the faces in a photo)",
                highlight=False,
                soft_wrap=True,
            )
    shown = sorted(scores, key=lambda s: -s.score) if sort else scores
    for s in shown:
        extra = f"\t({len(s.faces)} faces: {', '.join(f'{x:.4f}' for x in s.faces)})" if len(s.faces) > 1 else ""
        click.echo(f"{s.score:.4f}\t{s.path}{extra}")
    if len(scores) > 1:
        best = max(scores, key=lambda s: s.score)
        console.print(f"best: {best.path} ({best.score:.4f})", highlight=False)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"file": str(s.path), "score": s.score, "faces": s.faces, "warning": s.warning} for s in scores]
        json_path.write_text(json.dumps({"scores": rows, "errors": [str(e) for e in errors]}, indent=1) + "\n")
    if errors:
        sys.exit(1)


# ------------------------------------------------------------------ human labels and the SVM
def _load_labels(files, require_label: bool, **kw):
    """Pairs of several annotation files, printing one line per bad row; fails on unusable files."""
    from facerestore_cli.data.annotations import load_annotations

    pairs, errors = [], []
    for f in files:
        with user_errors():
            result = load_annotations(f, require_label=require_label, **kw)
        pairs += result.pairs
        errors += result.errors
    for err in errors:
        _error_line(f"{err} (row skipped)")
    return pairs, errors


@click.command("frm-import")
@click.argument("label_files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Validated pairs (JSONL) for train-frm / frm-annotate.",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder image paths are relative to [default: each file's folder].",
)
@click.option(
    "--min-rating-gap",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Ratings files: pair two images only when their mean ratings differ by at least this.",
)
@click.option(
    "--max-rating-pairs",
    type=click.IntRange(1),
    default=50_000,
    show_default=True,
    help="Ratings files: at most this many pairs (a seeded sample).",
)
def frm_import(label_files, out, root, min_rating_gap, max_rating_pairs) -> None:
    """Import and validate human labels: pairwise preferences or absolute ratings (CSV or JSONL).

    \b
    Pairwise: columns image_a, image_b, preferred (a, b or tie) [, caption, group, annotator]
    Ratings:  columns image, rating [, group, caption] (pairs are made within each group)
    Example:
      facerestore frm-import labels/human.csv -o data/frm_human.jsonl
    """
    from facerestore_cli.data.annotations import summarize, write_pairs

    pairs, errors = _load_labels(label_files, True, root=root, min_rating_gap=min_rating_gap, max_rating_pairs=max_rating_pairs)
    write_pairs(out, pairs)
    print_run_summary("frm-import summary", {"files": len(label_files), "pairs": len(pairs), "bad rows": len(errors), **summarize(pairs)})
    console.print(f"pairs: {out}")
    if not pairs:
        fail("no usable labels")
    if errors:
        sys.exit(1)


@click.command("frm-annotate")
@click.option(
    "--human",
    "human_files",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Human-labelled pairs (repeatable).",
)
@click.option(
    "--candidates",
    "candidate_files",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Unlabelled pairs to label (e.g. candidates.jsonl from frm-pairs).",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="SVM-labelled pairs (JSONL, source svm, weight = confidence).",
)
@click.option("--kernel", type=click.Choice(["rbf", "linear", "poly", "sigmoid"]), default="rbf", show_default=True)
@click.option("--C", "c", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="SVM regularisation.")
@click.option("--gamma", default="scale", show_default=True, callback=checked(_gamma), help="Kernel coefficient: scale, auto or a number.")
@click.option(
    "--scaling",
    type=click.Choice(["standard", "minmax", "none"]),
    default="standard",
    show_default=True,
    help="Feature scaling before the SVM.",
)
@click.option(
    "--min-confidence", type=click.FloatRange(0.5, 1), default=0.8, show_default=True, help="Keep only labels at least this sure."
)
@click.option(
    "--holdout",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of human pairs held out to measure agreement.",
)
@click.option(
    "--frm", "frm_path", type=click.Path(exists=True, path_type=Path), default=None, help="Also use this FRM's score as a feature."
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the report as JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
def frm_annotate(human_files, candidate_files, out, kernel, c, gamma, scaling, min_confidence, holdout, frm_path, json_path, seed) -> None:
    """Label candidate pairs with an SVM trained on the human-labelled ones (the hybrid pipeline).

    \b
    Example:
      facerestore frm-annotate --human data/frm_human.jsonl --candidates data/frm_train/candidates.jsonl -o data/frm_svm.jsonl
    """
    from facerestore_cli.data.annotations import write_pairs
    from facerestore_cli.data.svm import SvmConfig, auto_annotate

    with user_errors():
        cfg = SvmConfig(kernel, c, gamma, 3, scaling, min_confidence, holdout, seed)
    human, bad_h = _load_labels(human_files, True)
    cands, bad_c = _load_labels(candidate_files, False, default_source="auto")
    frm = _load_model(frm_path, "cpu", "ViT-H-14") if frm_path else None
    with user_errors():
        with progress_bar() as progress:
            task = progress.add_task("features", total=len({x for p in human + cands for x in (p.image_a, p.image_b)}))
            labelled, report = auto_annotate(
                human, [p for p in cands if p.preferred is None], cfg, frm, on_image=lambda _: progress.advance(task)
            )
    for path, reason in report.unreadable.items():
        _error_line(f"{path}: {reason} (pairs skipped)")
    write_pairs(out, labelled)
    rows = {
        "human pairs (a/b)": report.human_pairs,
        "fitted on": report.train_pairs,
        "held out": report.holdout_pairs,
        "held-out agreement": f"{report.holdout_agreement:.3f}",
        f"agreement when confident (>= {min_confidence:g})": f"{report.holdout_confident_agreement:.3f} on {report.holdout_confident_share:.0%} of held-out pairs",
        "candidates": report.candidates,
        "labelled (kept)": report.labelled,
        "dropped (not confident)": report.dropped_low_confidence,
    }
    print_run_summary("frm-annotate summary", rows)
    console.print(f"SVM-labelled pairs: {out}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if bad_h or bad_c or report.unreadable:
        sys.exit(1)


# ------------------------------------------------------------------ the labelling page
@click.command("label")
@click.argument("pair_files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Human labels (JSONL, appended; a restart resumes).",
)
@click.option("--annotator", default="", help="Your name or initials, stored with every label.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the left/right placement.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
def label_cmd(pair_files, out, annotator, port, seed, open_browser) -> None:
    """Serve a local page that shows two faces side by side and records which is better.

    \b
    Example:
      facerestore label data/frm_train/candidates.jsonl -o data/frm_human.jsonl --annotator me
      (then open http://127.0.0.1:8765/ ; keys: 1 / left, 2 / right, 0 / down = same, s = skip)
    """
    from facerestore_cli.data.labelling import LabelSession, make_server

    pairs, errors = _load_labels(pair_files, False, default_source="auto")
    if not pairs:
        fail("no usable pairs to label")
    session = LabelSession(pairs, out, annotator, seed)
    try:
        server = make_server(session, port=port)
    except OSError as err:
        fail(f"cannot listen on 127.0.0.1:{port} ({err.strerror or err}); try --port 0")
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    console.print(f"labelling {len(session.queue)} of {len(pairs)} pairs ({session.labelled} already in {out}) at {url}  (Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    # Ctrl-C (SIGINT) is how the page is stopped, even when started from a process that ignores
    # SIGINT (background jobs, some test runners), which Python would otherwise inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    state = session.state()
    console.print(
        f"{state['labelled']} of {state['total']} pairs labelled in {out}; import them with `facerestore frm-import {out} -o PAIRS.jsonl`"
    )
    if errors:
        sys.exit(1)
