"""Sweep a training config with Ray Tune, each trial a child MLflow run of one parent.

The job's code is ``shan_cli.sweep``; this file lets ``ray job submit`` run it by path
(``shan sweep`` is the same command). ``--help`` lists its options.
"""

from shan_cli import run_job
from shan_cli.sweep import main

if __name__ == "__main__":
    run_job(main)
