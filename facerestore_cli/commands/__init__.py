"""Click commands that live outside `cli.py`, registered on the `facerestore` group there."""
