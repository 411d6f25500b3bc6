"""``python -m shan_cli``: the ``shan`` command."""

from shan_cli.main import run

if __name__ == "__main__":
    run()
