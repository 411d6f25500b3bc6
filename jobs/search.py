"""Search a data set split for the images that match sentences.

The job's code is ``shan_cli.search``; this file lets ``ray job submit`` run it by path
(``shan search`` is the same command). ``--help`` lists its options.
"""

from shan_cli import run_job
from shan_cli.search import main

if __name__ == "__main__":
    run_job(main)
