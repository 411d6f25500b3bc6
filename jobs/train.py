"""Train SHAN on Ray Train and log to MLflow.

The job's code is ``shan_cli.train``; this file lets ``ray job submit`` run it by path
(``shan train`` is the same command). ``--help`` lists its options.
"""

from shan_cli import run_job
from shan_cli.train import main

if __name__ == "__main__":
    run_job(main)
