"""The CLI commands, one file per command group, registered on the `facerestore` group in `cli.py`;
`ui.py` is what they share (console, one-line errors, progress, tables, common options)."""
