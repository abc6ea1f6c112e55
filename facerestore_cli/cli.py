"""The `facerestore` command line: the click group and its commands (each in `commands/`)."""

from __future__ import annotations

import click

from facerestore_cli import __version__
from facerestore_cli.commands import data, eval, export, frm, lrpo, refl, restore, train
from facerestore_cli.commands.models import models as models_group
from facerestore_cli.commands.ui import user_errors


class _Group(click.Group):
    """The command group: a user error (`FacerestoreError`) that a command let through still ends
    in one line and exit code 2; any other exception is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> object:
        with user_errors():
            return super().invoke(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facerestore")
def main() -> None:
    """Restore degraded faces in photos and videos with a one-step diffusion restorer."""


for command in (
    restore.restore,
    data.prepare_data,
    data.degrade,
    train.train,
    eval.evaluate_cmd,
    frm.frm_pairs,
    frm.frm_import,
    frm.frm_annotate,
    frm.train_frm_cmd,
    frm.frm_eval,
    frm.score_cmd,
    frm.label_cmd,
    refl.refl_cmd,
    lrpo.lrpo_cmd,
    export.export_cmd,
    models_group,
):
    main.add_command(command)

if __name__ == "__main__":
    main()
