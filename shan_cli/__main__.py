"""``python -m shan_cli``: the ``shan`` command."""

from shan_cli.main import run

run()
