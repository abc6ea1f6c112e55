"""`models`: the published models, downloading their hub-hosted files and importing the rest
into the model store, so that `--model NAME` works. Option parsing and printing only; the table
of models is `models/published.py`, the model file format `models/model_file.py`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from facerestore_cli.commands.ui import console, fail, user_errors
from facerestore_cli.errors import InputError
from facerestore_cli.models.model_file import FileRecord, ModelFile, file_record, model_file_path, models_dir
from facerestore_cli.models.published import PUBLISHED, PublishedFile, PublishedModel, identify, install_state, published_model


def _say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True, markup=False)


@click.group("models", invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """The published face-restoration models: list them, download them, import their files.

    \b
    Examples:
      facerestore models                              # the table (same as `models list`)
      facerestore models pull lrpo-fidelity           # hub-hosted files, into the HF cache
      facerestore models import diffusionreward ~/Downloads/diffbir_refl.pt
      facerestore restore photos/ -o out/ --model lrpo-fidelity
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


def _installed_text(model: PublishedModel) -> str:
    state = install_state(model.name)
    if state.installed:
        return state.text
    from facerestore_cli.models.hub import cached_file

    hub = [f for f in model.files if f.hub_repo]
    have = sum(cached_file(f.hub_repo, f.filename) is not None for f in hub if f.hub_repo)
    return f"no ({have}/{len(model.files)} files downloaded)" if have else "no"


@models.command("list")
def list_cmd() -> None:
    """List the published models: paper, files, where each comes from, license, installed or not.

    The table goes to stdout (it is the command's output); notes go to stderr like every command's.
    """
    from rich.table import Table

    table = Table(title="Published face-restoration models")
    table.add_column("model", overflow="fold", min_width=max(len(m.name) for m in PUBLISHED))
    table.add_column("installed", overflow="fold", min_width=len("installed"))
    table.add_column("file", no_wrap=True)
    table.add_column("size", no_wrap=True)
    table.add_column("from", overflow="fold")
    table.add_column("license", overflow="fold")
    for model in PUBLISHED:
        n = len(model.files)
        about = [
            f"[bold]{model.name}[/bold]",
            model.paper,
            f"[dim]GPU {model.gpu_memory_gb(2):.1f} GB fp16, {model.gpu_memory_gb(4):.1f} GB fp32[/dim]",
        ]
        names = _spread(about, n)
        state = escape(_installed_text(model))
        for i, f in enumerate(model.files):
            table.add_row(
                names[i],
                state if i == 0 else "",
                f"{f.slot}: {f.filename}",
                "~" + _size(f.size_gb),
                escape(f.source),
                escape(f.license),
                end_section=i == n - 1,
            )
    Console().print(table)
    _say(f"store: {models_dir()} (FACERESTORE_HOME, else ~/.cache/facerestore)")
    _say("sizes are computed from parameter counts (fp32 files); GPU memory is for the weights alone, activations add to it")


def _spread(lines: list[str], rows: int) -> list[str]:
    """`lines` over `rows` table rows, one a row, the rest in the last one."""
    cells = [lines[i] if i < len(lines) else "" for i in range(rows - 1)]
    return cells + ["\n".join(lines[rows - 1 :])]


def _size(gb: float) -> str:
    return f"{gb:.1f} GB" if gb >= 0.95 else f"{gb * 1000:.0f} MB"


def _stored(name: str) -> ModelFile | None:
    """The store's model file of `name`, if there is a readable one (a broken one is replaced)."""
    path = model_file_path(name)
    if not path.is_file():
        return None
    try:
        return ModelFile.read(path)
    except InputError as err:
        _say(f"note: ignoring the stored model file: {err}")
        return None


def _manual_hint(name: str, manual: list[PublishedFile]) -> None:
    for f in manual:
        _say(f"{f.filename} is not on a hub; download it (~{_size(f.size_gb)}) from {f.link}")
    paths = " ".join(f"~/Downloads/{f.filename}" for f in manual)
    _say(f"then run: facerestore models import {name} {paths}   (with the path where you saved it)")


def _records(paths: dict[str, Path], old: ModelFile | None) -> dict[str, FileRecord]:
    """sha256 and size of each file; a record of the same file at the same size is kept as is."""
    records: dict[str, FileRecord] = {}
    todo: dict[str, Path] = {}
    for slot, p in paths.items():
        prev = old.files.get(slot) if old is not None and old.slot_paths().get(slot) == p else None
        if prev is not None and prev.sha256 and p.is_file() and prev.size == p.stat().st_size:
            records[slot] = prev
        else:
            todo[slot] = p
    files = {s: p for s, p in todo.items() if p.is_file()}
    columns = (TextColumn("[bold]sha256 {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for slot, p in todo.items():
            if slot in files:
                task = progress.add_task(p.name, total=p.stat().st_size)
                records[slot] = file_record(p, lambda n, task=task: progress.advance(task, n))
            else:
                records[slot] = FileRecord()
    return records


def _write(model: PublishedModel, paths: dict[str, Path], old: ModelFile | None, how: str) -> Path:
    entry = ModelFile(kind=model.kind, preset=model.preset, **{s: paths[s] for s in model.slots})
    entry.files = _records(paths, old)
    entry.meta = {"name": model.name, "paper": model.paper, "written_by": f"facerestore models {how}"}
    path = entry.write(model_file_path(model.name))
    _say(f"wrote {path}")
    return path


def _next_step(model: PublishedModel) -> None:
    if model.kind == "frm":
        _say(f"use it with: facerestore score FACES/ --model {model.name}")
    else:
        _say(f"use it with: facerestore restore photos/ -o out/ --model {model.name}")


@models.command("pull")
@click.argument("name")
def pull_cmd(name: str) -> None:
    """Download NAME's hub-hosted files (into the Hugging Face cache, resumable) and install it.

    Files that are only on Google Drive or GitHub get their link and the `models import`
    command to run once downloaded. HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME and HF_TOKEN are
    honoured as huggingface_hub does.
    """
    from facerestore_cli.models.hub import hub_download

    with user_errors():
        model = published_model(name)
    old = _stored(name)
    kept = old.slot_paths() if old is not None else {}
    paths: dict[str, Path] = {}
    manual: list[PublishedFile] = []
    for f in model.files:
        if f.hub_repo:
            _say(f"{f.slot}: {f.filename} from {f.source} (~{_size(f.size_gb)})")
            with user_errors(f"{name}: "):
                paths[f.slot] = hub_download(f.hub_repo, f.filename)
        elif f.slot in kept and kept[f.slot].exists():
            paths[f.slot] = kept[f.slot]
            _say(f"{f.slot}: {kept[f.slot]} (imported before)")
        else:
            manual.append(f)
    if manual:
        _say(f"{name} is not installed yet: {len(manual)} of its files must be fetched by hand")
        _manual_hint(name, manual)
        return
    _write(model, paths, old, "pull")
    _next_step(model)


def _layouts(model: PublishedModel) -> str:
    return "; ".join(f"{f.slot} = {f.layout[f.layout.index(' ') + 1 :]}" for f in model.files)


@models.command("import")
@click.argument("name")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def import_cmd(name: str, files: tuple[Path, ...]) -> None:
    """Check FILES' layouts, give each its slot in NAME, record their sha256 and install NAME.

    Each file's slot is found from its tensors' names (read memory-mapped, not loaded). Slots
    not given here are taken from the Hugging Face cache (after `models pull`) or from NAME's
    earlier import. The files stay where they are: the model file records their paths.
    """
    from facerestore_cli.models.hub import cached_file

    with user_errors():
        model = published_model(name)
    given: dict[str, Path] = {}
    for p in files:
        with user_errors():
            slot, looks = identify(p)
        if slot is None or slot not in model.slots:
            fail(f"{p}: looks like {looks}, which is no file of {name} (it takes {_layouts(model)})")
        if slot in given:
            fail(f"{p} and {given[slot]} are both for the {slot} slot; {name} takes one")
        expected = model.file(slot).filename
        if p.name != expected:
            _say(f"note: {p.name} is not named {expected}; taken as {name}'s {slot} by its layout ({looks})")
        given[slot] = p.absolute()
    old = _stored(name)
    kept = old.slot_paths() if old is not None else {}
    paths: dict[str, Path] = {}
    for f in model.files:
        found = given.get(f.slot) or (cached_file(f.hub_repo, f.filename) if f.hub_repo else None)
        found = found or (kept[f.slot] if f.slot in kept and kept[f.slot].exists() else None)
        if found is None:
            how = f"run `facerestore models pull {name}` first" if f.hub_repo else f"download it from {f.link}"
            fail(f"{name}: no {f.slot} file ({f.filename}); give it here or {how}")
        paths[f.slot] = found
    _write(model, paths, old, "import")
    _next_step(model)
