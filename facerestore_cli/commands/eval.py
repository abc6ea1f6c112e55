"""`eval`: restorers and baselines scored on a test set. Option parsing and printing only; the
work is in `facerestore_cli.evaluate`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from facerestore_cli.commands.ui import color_fix_option, device_option, fail, progress_bar, user_errors


def _ranked(result, method: str, metric: str) -> bool:
    """Whether a cell competes for best: not the ground truth, nor the input scored against itself."""
    return method != "ground_truth" and not (method == "input" and result.reference.get(metric) == "input")


def _metric_table(result) -> Table:
    table = Table(title=f"{result.source}: {result.images} image(s)")
    table.add_column("method")
    for m in result.metrics:
        table.add_column(f"{m.name} {'↓' if m.lower_better else '↑'}", justify="right")
    table.add_column("s / image", justify="right")
    best = {}
    for m in result.metrics:
        vals = [(v, k) for k, row in result.table.items() if _ranked(result, k, m.name) and (v := row.get(m.name)) is not None and v == v]
        if vals:
            best[m.name] = (min if m.lower_better else max)(vals)[1]
    for method in result.methods:
        row = result.table[method]
        cells = []
        for m in result.metrics:
            v = row.get(m.name)
            text = "" if v is None else ("n/a" if v != v else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}")
            if not _ranked(result, method, m.name) and text:
                text = f"({text})"  # the input against itself: perfect by construction
            cells.append(f"[bold]{text}[/bold]" if best.get(m.name) == method else text)
        secs = result.seconds_per_image.get(method)
        table.add_row(method, *cells, "" if secs is None else f"{secs:.3f}")
    return table


@click.command("eval")
@click.option("--pairs", type=click.Path(path_type=Path), default=None, help="Pair folder with lq/ and hq/ (from `facerestore degrade`).")
@click.option(
    "--lq",
    "lq_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Folder of LQ aligned crops without ground truth, searched recursively; repeat to pool several in one table.",
)
@click.option(
    "--input-reference",
    is_flag=True,
    help="Also score identity metrics against the degraded input (as identity@input): for --lq sets without ground truth.",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Restorer folder; repeat to compare several [default: bundled weights/restorer-tiny].",
)
@click.option("--baselines-only", is_flag=True, help="Score only the baselines (input, bicubic_unsharp).")
@click.option("--metrics", default="all", show_default=True, help="Comma-separated metric names (see --list-metrics).")
@click.option(
    "--grid",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG grid: input | baseline | restored | ground truth.",
)
@click.option("--grid-rows", type=click.IntRange(1), default=6, show_default=True)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the table, reasons and per-image scores as JSON.",
)
@device_option()
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@color_fix_option("Colour fix after the restorer (as `restore` applies it).")
@click.option("--size", type=click.IntRange(16), default=None, help="Restore and score at SIZE x SIZE [default: the ground truth's size].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images.")
@click.option("--list-metrics", is_flag=True, help="List every metric, whether it can run here and why not, then exit.")
def evaluate_cmd(
    pairs,
    lq_dirs,
    input_reference,
    models,
    baselines_only,
    metrics,
    grid,
    grid_rows,
    json_path,
    device,
    precision,
    batch_size,
    color_fix,
    size,
    limit,
    list_metrics,
) -> None:
    """Restore degraded faces with each --model and baselines, and score them with quality metrics.

    With --pairs every metric runs against the ground truth. With --lq (real photos, no ground
    truth) only no-reference metrics run, unless --input-reference: then identity and
    identity_dist are also scored against the degraded input itself, reported as identity@input
    and identity_dist@input (does the output still show the person in the input?). The `input`
    row is that very image, so it scores perfectly there by construction: shown in parentheses,
    never ranked. PSNR/SSIM are not scored against the input (they would reward doing nothing).

    \b
    Examples:
      facerestore eval --pairs data/val_pairs --model runs/tiny/final --grid grid.png --json scores.json
      facerestore eval --lq real/CodeFormer/inputs/cropped_faces --lq real/GPEN/examples/grays --input-reference
    """
    import json

    out = Console()
    if not out.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        out = Console(width=200)
    if list_metrics:
        from facerestore_cli.metrics import list_metrics as names
        from facerestore_cli.metrics import metric_info

        table = Table(title="metrics")
        for col in ("name", "kind", "better", "here", "what"):
            table.add_column(col)
        for n in names():
            i = metric_info(n)
            table.add_row(
                i.name,
                i.kind,
                "lower" if i.lower_better else "higher",
                "yes" if i.available else f"no: {i.unavailable_reason}",
                i.description,
            )
        out.print(table)
        return
    from facerestore_cli.devices import resolve_device, resolve_dtype
    from facerestore_cli.evaluate import evaluate
    from facerestore_cli.models.loading import DEFAULT_MODEL

    if (pairs is None) == (not lq_dirs):
        fail("give exactly one of --pairs DIR or --lq DIR (repeatable)")
    if baselines_only and models:
        fail("--baselines-only and --model exclude each other")
    wanted = None if metrics.strip().lower() == "all" else [m for m in metrics.split(",") if m.strip()]
    with user_errors():
        dev = resolve_device(device)
        dtype = resolve_dtype(precision, dev)
        chosen = [] if baselines_only else list(models) or [DEFAULT_MODEL]
        with progress_bar() as progress:
            task = progress.add_task("evaluating", total=None)
            result = evaluate(
                pairs=pairs,
                lq=list(lq_dirs) or None,
                models=chosen,
                metrics=wanted,
                device=dev,
                dtype=dtype,
                batch_size=batch_size,
                color_fix=color_fix,
                size=size,
                grid=grid,
                grid_rows=grid_rows,
                limit=limit,
                input_reference=input_reference,
                on_start=lambda n: progress.update(task, total=n),
                on_batch=lambda n: progress.advance(task, n),
            )
    out.print(_metric_table(result))
    at_input = [m for m, ref in result.reference.items() if ref == "input"]
    if at_input:
        out.print(
            f"{', '.join(at_input)}: against the degraded input, not ground truth; (input) is that image itself, perfect by construction",
            highlight=False,
            soft_wrap=True,
        )
    for m in result.metrics:
        if any(result.counts[k].get(m.name, 1) == 0 for k in result.methods):
            out.print(f"n/a: {m.name} could not be computed for those images ({m.description})", highlight=False, soft_wrap=True)
    by_reason: dict[str, list[str]] = {}
    for name, reason in {**result.unavailable, **result.skipped}.items():
        by_reason.setdefault(reason, []).append(name)
    if by_reason:
        out.print("not computed: " + "; ".join(f"{', '.join(n)}: {r}" for r, n in by_reason.items()), highlight=False, soft_wrap=True)
    if result.grid:
        out.print(f"grid: {result.grid}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        out.print(f"json: {json_path}")
