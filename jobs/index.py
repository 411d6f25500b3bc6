"""Build the image index of a data set split for a trained model.

The job's code is ``shan_cli.index``; this file lets ``ray job submit`` run it by path
(``shan index build`` is the same command: ``python jobs/index.py build --model ...``).
``--help`` lists its options.
"""

from shan_cli import run_job
from shan_cli.index import main

if __name__ == "__main__":
    run_job(main)
