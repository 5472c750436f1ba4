"""The ``fastckpt`` command line (typer) and its demo."""
