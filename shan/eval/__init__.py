"""The evaluation job: the tiled distributed similarity matrix on Ray actors (``tiles``), the
protocol's metrics and outputs (``job``, ``outputs``), the lock on ``--out`` (``lock``) and the
evaluation's MLflow run (``record``). Model references and promotion are library modules
(``shan.tracking.refs``, ``shan.promotion``)."""

PROTOCOLS = ("plain", "f30k", "coco-1k", "coco-5k")
