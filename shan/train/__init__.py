"""Training on Ray Train: the driver (``driver``), the per-worker loop (``worker``) and the faults
the tests inject into it (``faults``). Sizing and Ray start-up are in ``shan.runtime``, MLflow
helpers in ``shan.tracking``."""
