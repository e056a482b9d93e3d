"""MLflow on rank 0, and never the reason a training job dies.

A thin adapter over the MLflow client: one run per job (resumed by id after a restart), params as dotted keys,
metrics by step, artifacts. If the tracking server cannot be reached, the tracker warns once, keeps the
metrics in memory (bounded) and retries at later logging calls; training goes on either way.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

from pause_megatron.config import TrackingConfig

MAX_BUFFERED = 100_000  # metric points kept while the server is unreachable (~a few MB)
RETRY_SECONDS = 60.0  # how often to try an unreachable server again


class Tracker:
    """Logs to MLflow when `enabled` (rank 0 with tracking on); otherwise every call is a no-op."""

    def __init__(self, cfg: TrackingConfig, *, enabled: bool):
        self.cfg = cfg
        self.enabled = enabled and cfg.enabled
        self.run_id: Optional[str] = None
        self._client = None
        self._buffer: list[tuple[str, float, int, int]] = []
        self._down_since: Optional[float] = None
        self._warned = False
        if self.enabled:
            # Fail fast instead of retrying for minutes against a dead server.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — any tracking failure must not stop training
            self._down_since = self._down_since or time.monotonic()
            if not self._warned:  # printed, not warnings.warn: it must show even where warnings are filtered
                print(f"warning: MLflow ({self.cfg.uri}): {what} failed ({type(exc).__name__}: {exc}); "
                      "training continues, metrics are buffered and retried", file=sys.stderr, flush=True)
                self._warned = True
            return None
        self._down_since = None
        return result

    def start(self, *, params: dict[str, Any], tags: dict[str, str], resume_run_id: Optional[str] = None,
              parent_run_id: Optional[str] = None) -> Optional[str]:
        """Create (or resume) the run; returns its id, or None when tracking is off or unreachable."""
        if not self.enabled:
            return None
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.cfg.uri)
        if resume_run_id:
            self.run_id = resume_run_id
            self._call("resume run", self._client.update_run, resume_run_id, status="RUNNING")
            return self.run_id
        exp = self._call("get experiment", self._client.get_experiment_by_name, self.cfg.experiment)
        exp_id = exp.experiment_id if exp else self._call("create experiment", self._client.create_experiment,
                                                           self.cfg.experiment)
        if exp_id is None:
            return None
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._call("create run", self._client.create_run, exp_id, tags=all_tags, run_name=self.cfg.run_name)
        if run is None:
            return None
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters; ours are short scalars.
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self._call("log params", self._client.log_batch, self.run_id, params=items[i : i + 100])
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        self._buffer.extend((k, float(v), now, step) for k, v in metrics.items() if v is not None)
        del self._buffer[:-MAX_BUFFERED]
        if self._down_since is not None and time.monotonic() - self._down_since < RETRY_SECONDS:
            return
        self.flush()

    def flush(self) -> None:
        if not self.enabled or not self._buffer or self.run_id is None or self._client is None:
            return
        from mlflow.entities import Metric

        pending = self._buffer
        for i in range(0, len(pending), 1000):  # log_batch takes at most 1000 metrics per call
            chunk = [Metric(k, v, ts, st) for k, v, ts, st in pending[i : i + 1000]]
            if self._call("log metrics", self._client.log_batch, self.run_id, metrics=chunk) is None and \
                    self._down_since is not None:
                self._buffer = pending[i:]
                return
        self._buffer = []

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        if self.enabled and self.run_id and self._client and os.path.exists(path):
            self._call("log artifact", self._client.log_artifact, self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled and self.run_id and self._client:
            self._call("set tag", self._client.set_tag, self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (a preempted run that will resume)."""
        if self.enabled and self.run_id and self._client:
            self.flush()
            self._call("end run", self._client.set_terminated, self.run_id, status)
