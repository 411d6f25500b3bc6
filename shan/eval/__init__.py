"""The evaluation job: model references, the tiled distributed similarity matrix, outputs,
and scheduled promotion of registered models."""

PROTOCOLS = ("plain", "f30k", "coco-1k", "coco-5k")
