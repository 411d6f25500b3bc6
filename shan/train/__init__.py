"""Training on Ray Train: the per-worker loop, the driver, resources and MLflow tracking."""
