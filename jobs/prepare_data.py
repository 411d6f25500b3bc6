"""Make data sets in the project's format: convert SCAN precomp, extract from images, generate,
validate.

The job's code is ``shan_cli.prepare_data``; this file lets ``ray job submit`` run it by path
(``shan data`` is the same command). ``--help`` lists its options.
"""

from shan_cli import run_job
from shan_cli.prepare_data import main

if __name__ == "__main__":
    run_job(main)
