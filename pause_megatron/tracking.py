"""MLflow on rank 0, and never the reason a training job dies or waits.

A thin adapter over the MLflow client: one run per job (resumed by id after a restart), params as dotted keys,
metrics by step, artifacts. Every MLflow call runs on one background thread: the training thread only queues
work, so a slow or hung server never sits on a training step. When the server cannot be reached (or does not
answer), the tracker warns once, keeps metrics in memory (bounded) and retries RETRY_SECONDS after each
failure, run creation included; what was queued arrives once the server answers again, in the order it was
submitted (metrics logged before a tag or the end status reach the server before it).
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

from pause_megatron.config import TrackingConfig

MAX_BUFFERED = 100_000  # metric points kept while the server is unreachable (~a few MB)
RETRY_SECONDS = 30.0  # wait after each failed call before trying the server again
START_WAIT_SECONDS = 5.0  # how long start() waits for a remote server to create the run
END_WAIT_SECONDS = 60.0  # how long end() waits for queued work to reach the server before giving up
END_TRIES = 3  # tries within END_WAIT_SECONDS: a transient error is retried, a dead server costs seconds
RUN_WAIT_SECONDS = 120.0  # wait_for_run_id() for a caller that needs the id: ~6 tries at a 10 s request timeout
HTTP_TIMEOUT_SECONDS = "10"  # per request; a hung server costs the background thread this much per try


class Tracker:
    """Logs to MLflow when `enabled` (rank 0 with tracking on); otherwise every call is a no-op."""

    def __init__(self, cfg: TrackingConfig, *, enabled: bool):
        self.cfg = cfg
        self.enabled = enabled and cfg.enabled
        self.run_id: Optional[str] = None
        self._client = None
        self._cond = threading.Condition()
        self._points = PointBuffer()
        # (what, call(client, run_id), points logged before it): a call waits for the points queued before it
        self._ops: collections.deque[tuple[str, Callable, int]] = collections.deque()
        self._create: Optional[Callable] = None  # creates (or resumes) the run; cleared once it succeeded
        self._retry_at = 0.0  # monotonic time before which the server is not tried again
        self._ending = False
        self._failures = 0
        self._first_try_done = threading.Event()
        self._dropped_kinds: set[str] = set()
        self._thread: Optional[threading.Thread] = None
        self._warned = False
        if self.enabled:
            # Fail fast instead of retrying for minutes against a dead server: retries are ours, off the step.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_SECONDS)

    # ---- called from the training thread: queue and return ------------------------------------------------

    def start(self, *, params: dict[str, Any], tags: dict[str, str], resume_run_id: Optional[str] = None,
              parent_run_id: Optional[str] = None) -> Optional[str]:
        """Create (or resume) the run; returns its id, or None when tracking is off or the run is not made yet.

        A local store (sqlite, file) is waited for; a remote server at most START_WAIT_SECONDS, after which the
        run is created in the background (retried until it succeeds) and `run_id` is set then.
        """
        if not self.enabled:
            return None
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.cfg.uri)
        if resume_run_id:
            self.run_id = resume_run_id
            self._ops.append(("resume run", lambda c, run: c.update_run(run, status="RUNNING"), 0))
        else:
            all_tags = dict(tags)
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            self._create = lambda c: self._create_run(c, all_tags)
        # MLflow caps a param value at 6000 characters and a log_batch call at 100 params; ours are short scalars.
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        if resume_run_id:  # a param cannot change value in MLflow: log the new ones, tag the changed ones
            self._ops.append(("log params", lambda c, run: _log_resumed_params(c, run, items), 0))
        else:
            for i in range(0, len(items), 100):
                chunk = items[i : i + 100]
                self._ops.append(("log params", lambda c, run, chunk=chunk: c.log_batch(run, params=chunk), 0))
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        remote = self.cfg.uri.startswith(("http://", "https://", "databricks"))
        self._first_try_done.wait(START_WAIT_SECONDS if remote else None)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        if not self.enabled or self._thread is None:
            return
        now = int(time.time() * 1000)
        with self._cond:
            self._points.append([(k, float(v), now, step) for k, v in metrics.items() if v is not None])
            self._cond.notify_all()

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        if self.enabled and self._thread is not None and os.path.exists(path):
            self._queue("log artifact", lambda c, run: c.log_artifact(run, path, artifact_path))

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled and self._thread is not None:
            self._queue("set tag", lambda c, run: c.set_tag(run, key, value))

    def wait_for_run_id(self, timeout: Optional[float] = None) -> Optional[str]:
        """Block until the run exists, retrying a failed creation within `timeout` s (RUN_WAIT_SECONDS); its
        id, or None."""
        if not self.enabled or self._thread is None:
            return None
        self._wait(lambda: self.run_id is not None and self._create is None,
                   RUN_WAIT_SECONDS if timeout is None else timeout)
        return self.run_id

    def flush(self, timeout: Optional[float] = None, tries: Optional[int] = None) -> bool:
        """Try the server now and wait until everything queued has reached it; False after `tries` (END_TRIES)
        failed tries or `timeout` (END_WAIT_SECONDS) s; a hung server costs one HTTP timeout per try."""
        if not self.enabled or self._thread is None:
            return True
        return self._wait(lambda: not self._pending(), END_WAIT_SECONDS if timeout is None else timeout,
                          END_TRIES if tries is None else tries)

    def _wait(self, done: Callable[[], bool], timeout: float, tries: Optional[int] = None) -> bool:
        """Wait for `done`, trying the server now and, after a failure, again after 1, 2, 4... s (not after
        RETRY_SECONDS) while `timeout` and `tries` last."""
        deadline = time.monotonic() + timeout
        backoff = 1.0
        with self._cond:
            failures = self._failures
            self._retry_at = 0.0  # try now rather than at the end of a back-off
            self._cond.notify_all()
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                if self._failures > failures:
                    failures = self._failures
                    if tries is not None:
                        tries -= 1
                        if tries <= 0:
                            return False
                    self._retry_at = time.monotonic() + min(backoff, left)
                    backoff = min(2 * backoff, RETRY_SECONDS)
                    self._cond.notify_all()
                self._cond.wait(min(left, 0.5))
        return True

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (a preempted run that will resume); waits at most END_WAIT_SECONDS, in
        which a failed send is tried again (END_TRIES tries in all)."""
        if not self.enabled or self._thread is None:
            return
        self._queue("end run", lambda c, run: c.set_terminated(run, status))
        sent = self.flush()
        with self._cond:
            self._ending = True
            self._cond.notify_all()
        if not sent:
            print(f"warning: MLflow ({self.cfg.uri}): unreachable at the end of the run; what was not sent yet "
                  "(metrics, end status) is lost", file=sys.stderr, flush=True)

    # ---- the background thread --------------------------------------------------------------------------

    def _queue(self, what: str, call: Callable) -> None:
        with self._cond:
            self._ops.append((what, call, self._points.logged))
            self._cond.notify_all()

    def _pending(self) -> bool:
        return bool(self._create or self._points or self._ops)

    def _create_run(self, client, tags: dict[str, str]) -> str:
        exp = client.get_experiment_by_name(self.cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.cfg.experiment)
        return client.create_run(exp_id, tags=tags, run_name=self.cfg.run_name).info.run_id

    def _failed(self, what: str, exc: Exception) -> None:
        with self._cond:
            self._retry_at = time.monotonic() + RETRY_SECONDS  # refreshed on every failure
            self._failures += 1
        if not self._warned:  # printed, not warnings.warn: it must show even where warnings are filtered
            print(f"warning: MLflow ({self.cfg.uri}): {what} failed ({type(exc).__name__}: {exc}); "
                  "training continues, metrics are buffered and retried", file=sys.stderr, flush=True)
            self._warned = True

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ending and (not self._pending() or time.monotonic() < self._retry_at):
                    wait = self._retry_at - time.monotonic() if self._pending() else None
                    self._cond.wait(wait)
                if self._ending:
                    return
            try:
                self._send_once()
            finally:  # start() waits for this: set it even if the pass raised past its own handler
                self._first_try_done.set()
            with self._cond:
                self._cond.notify_all()  # wake flush()

    def _send_once(self) -> None:
        """One pass: create the run if needed, then queued calls and metric points in the order they came."""
        from mlflow.entities import Metric

        client = self._client
        what = "create run"
        try:
            if self._create is not None:
                self.run_id = self._create(client)
                self._create = None
            while True:
                with self._cond:
                    op = self._ops[0] if self._ops else None
                    # log_batch takes at most 1000 metrics per call; none logged after the next queued call
                    start, points = self._points.peek(1000, before=op[2] if op else None)
                if points:
                    what = "log metrics"
                    try:
                        client.log_batch(self.run_id, metrics=[Metric(k, v, ts, st) for k, v, ts, st in points])
                    except Exception as exc:
                        if not _refused(exc):
                            raise
                        self._dropped(what, exc)
                    with self._cond:
                        self._points.sent(start, len(points))
                elif op is not None:
                    what = op[0]
                    try:
                        op[1](client, self.run_id)
                    except Exception as exc:
                        if not _refused(exc):
                            raise
                        self._dropped(what, exc)
                    with self._cond:
                        self._ops.popleft()
                else:
                    return
        except Exception as exc:  # noqa: BLE001 — any tracking failure must not stop training
            self._failed(what, exc)

    def _dropped(self, what: str, exc: Exception) -> None:
        """The server refused a call (not a failure to reach it): retrying cannot help, so it is dropped, said
        once per kind of call, and what was queued after it goes on."""
        if what not in self._dropped_kinds:
            self._dropped_kinds.add(what)
            print(f"warning: MLflow ({self.cfg.uri}): the server refused {what} ({type(exc).__name__}: {exc}); "
                  "dropped, the rest is still sent", file=sys.stderr, flush=True)


# MLflow's answers to a call that is wrong rather than unlucky: retrying the same call cannot succeed.
REFUSED_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST")


def _refused(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in REFUSED_CODES


def _log_resumed_params(client, run_id: str, items: list) -> None:
    """On resume: params the run lacks are logged; a changed one (MLflow refuses a new value for a param) is
    recorded as the tag `resumed.<key>` = "old -> new"."""
    from mlflow.entities import RunTag

    have = client.get_run(run_id).data.params
    new = [p for p in items if p.key not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])
    changed = [RunTag(f"resumed.{p.key}", f"{have[p.key]} -> {p.value}"[:5000]) for p in items
               if p.key in have and have[p.key] != p.value]
    for i in range(0, len(changed), 100):
        client.log_batch(run_id, tags=changed[i : i + 100])


class PointBuffer:
    """Metric points waiting for the server, the oldest dropped beyond MAX_BUFFERED.

    Points are counted from the start of the run (`logged` so far; `first` is the count of the oldest kept), so
    a batch sent while the cap drops older points is removed by its numbers, not by its length.
    """

    def __init__(self):
        self.points: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self.first = 0

    @property
    def logged(self) -> int:
        return self.first + len(self.points)

    def __bool__(self) -> bool:
        return bool(self.points)

    def append(self, points: list[tuple[str, float, int, int]]) -> None:
        self.points.extend(points)
        drop = len(self.points) - MAX_BUFFERED
        if drop > 0:
            del self.points[:drop]
            self.first += drop

    def peek(self, limit: int, before: Optional[int] = None) -> tuple[int, list]:
        """(number of the first point, up to `limit` oldest points), only points numbered below `before`."""
        end = len(self.points) if before is None else max(0, min(len(self.points), before - self.first))
        return self.first, self.points[: min(limit, end)]

    def sent(self, start: int, n: int) -> None:
        """Points `start` .. `start + n - 1` reached the server; those the cap already dropped are gone."""
        done = start + n - self.first
        if done > 0:
            del self.points[:done]
            self.first += done
