"""Sweeps: a search space over the training config (``spec``), Ray Tune trials that are
trainings as MLflow child runs of one parent, ASHA on ``val/rsum`` (``job``), and the parent's
table and plot (``report``). ``shan sweep`` (shan_cli/sweep.py) is the command line."""
