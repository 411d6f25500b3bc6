"""System metrics of a training: MLflow's own ``SystemMetricsMonitor`` (CPU, memory, disk,
network, and NVIDIA GPUs through ``pynvml``) logging ``system/<node>/...`` into the run."""

from __future__ import annotations

import logging
from typing import Any

_log = logging.getLogger(__name__)


class SystemMetrics:
    """While in its ``with`` block, samples this node every ``every`` seconds into run
    ``run_id`` as ``system/<node_id>/<metric>`` (``every`` 0: nothing). A block shorter than
    one interval still logs one sample when it ends; a restarted training goes on from the
    run's last step."""

    def __init__(self, uri: str, run_id: str, every: float, node_id: str | None = None) -> None:
        self.uri, self.run_id, self.every, self.node_id = uri, run_id, every, node_id
        self.monitor: Any = None
        self._first_step = 0

    def start(self) -> None:
        """Start sampling. Never raises: without system metrics the training goes on."""
        if self.every <= 0 or self.monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.every,
                resume_logging=True,
                node_id=self.node_id,
                tracking_uri=self.uri,
            )
            self._first_step = monitor._logging_step
            monitor.start()
        except Exception as e:
            _log.warning("system metrics: not sampled (%s: %s)", type(e).__name__, e)
            return
        self.monitor = monitor

    def stop(self) -> None:
        """Stop sampling; a last sample when none was logged yet. Never raises: the
        training's own outcome matters more."""
        m, self.monitor = self.monitor, None
        if m is None:
            return
        try:
            m.finish()
            if m._logging_step == self._first_step:
                m.collect_metrics()
                m.publish_metrics(m.aggregate_metrics())
                m.mlflow_logger.flush()
        except Exception as e:
            _log.warning("system metrics: the last sample was not logged (%s)", e)

    def __enter__(self) -> SystemMetrics:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
