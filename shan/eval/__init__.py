"""The evaluation job: model references, the tiled distributed similarity matrix, outputs,
and scheduled promotion of registered models."""
