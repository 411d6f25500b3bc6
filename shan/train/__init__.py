"""Training on Ray Train: the driver (``driver``) and the per-worker loop (``worker``). Sizing and
Ray start-up are in ``shan.runtime``, MLflow helpers in ``shan.tracking``."""
