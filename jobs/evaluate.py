"""Evaluate trained SHAN models: the whole similarity matrix on Ray actors, logged to MLflow.

The job's code is ``shan_cli.evaluate``; this file lets ``ray job submit`` run it by path
(``shan evaluate`` is the same command). ``--help`` lists its options.
"""

from shan_cli import run_job
from shan_cli.evaluate import main

if __name__ == "__main__":
    run_job(main)
