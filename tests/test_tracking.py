"""MLflow tracking against a hung server: the training thread never waits on it, and nothing is lost once it
answers again. Loopback only: a TCP proxy on 127.0.0.1 that first accepts and never replies, then forwards to a
real MLflow tracking server (MLflow's own server app on a SQLite store, in a subprocess)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from pause_megatron import recipe, tracking
from pause_megatron.config import TrackingConfig

HUNG_REQUEST_S = 30  # an HTTP request to the hung server fails only after this; a blocked step would show it

SERVER = """
from werkzeug.serving import make_server
from mlflow.server import app
srv = make_server("127.0.0.1", 0, app, threaded=True)
print(srv.server_port, flush=True)
srv.serve_forever()
"""


class HangThenForward:
    """Listens on 127.0.0.1: holds every connection unanswered until `recover(port)`, then forwards to `port`
    (held connections are closed, so requests in flight fail at once, as with a restarted server)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.target = None
        self.held: list[socket.socket] = []
        self.connections = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            if self.target is None:
                self.held.append(conn)  # accepted, never answered
            else:
                upstream = socket.create_connection(("127.0.0.1", self.target))
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
        self.sock.close()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def recover(self, port: int):
        self.target = port
        for conn in self.held:
            conn.close()

    def stop(self):
        self.stopped.set()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on a free loopback port (started now, ready in ~10-20 s); calling the
    fixture's value waits until it answers and gives its port."""
    env = {**os.environ, "_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{tmp_path}/mlflow.db",
           "_MLFLOW_SERVER_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    port = {}

    def ready():
        port["p"] = int(proc.stdout.readline())
        # The first request makes the store (seconds): made here, so a test's short request timeout meets a
        # server that answers at once.
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port['p']}/api/2.0/mlflow/experiments/get-by-name"
                                   "?experiment_name=Default", timeout=120).close()
        except urllib.error.HTTPError:
            pass

    reader = threading.Thread(target=ready, daemon=True)
    reader.start()
    yield lambda: (reader.join(120), port["p"])[1]
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_hung_server_never_blocks_training_and_gets_everything_once_it_answers(mlflow_server, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HUNG_REQUEST_S))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 1.0)
    from mlflow.tracking import MlflowClient  # imported before timing: its import is slow, and not the server's

    proxy = HangThenForward()
    try:
        tracker = tracking.Tracker(TrackingConfig(uri=f"http://127.0.0.1:{proxy.port}", experiment="hung"),
                                   enabled=True)
        t0 = time.monotonic()
        run_id = tracker.start(params={"model.num_layers": 4}, tags={"stage": "pretrain"})
        started_in = time.monotonic() - t0
        # Bounded by START_WAIT_SECONDS, not by the hung request (30 s), and no run yet.
        assert started_in < tracking.START_WAIT_SECONDS + 2 < HUNG_REQUEST_S and run_id is None
        assert proxy.connections >= 1  # it did try the server

        worst = 0.0
        for step in range(1, 6):  # "training steps" while the server hangs
            t = time.monotonic()
            tracker.log_metrics({"train/loss": 10.0 - step, "perf/mfu": None}, step=step)
            tracker.set_tag("last_step", str(step))
            worst = max(worst, time.monotonic() - t)
        assert worst < 1.0 < HUNG_REQUEST_S  # queued, not sent on the training thread

        proxy.recover(mlflow_server())
        deadline = time.monotonic() + 90
        while tracker.run_id is None and time.monotonic() < deadline:  # run creation is retried
            time.sleep(0.2)
        assert tracker.run_id is not None
        tracker.log_metrics({"train/loss": 4.0}, step=6)
        tracker.end("FINISHED")
    finally:
        proxy.stop()

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_server()}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.num_layers": "4"} and run.data.tags["stage"] == "pretrain"
    assert run.data.tags["last_step"] == "5"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 10.0 - s) for s in range(1, 7)]
    assert "MLflow (http://127.0.0.1" in capsys.readouterr().err  # warned once that it was down


@pytest.mark.slow
def test_retry_gate_is_refreshed_after_every_failure(monkeypatch):
    """A resumed run on a server that never answers: tried once per (request timeout + RETRY_SECONDS), off the
    training thread, not on every logging call once the first back-off has passed."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 3.0)
    monkeypatch.setattr(tracking, "START_WAIT_SECONDS", 0.5)
    monkeypatch.setattr(tracking, "END_WAIT_SECONDS", 2.5)
    proxy = HangThenForward()
    try:
        tracker = tracking.Tracker(TrackingConfig(uri=f"http://127.0.0.1:{proxy.port}"), enabled=True)
        tracker.start(params={}, tags={}, resume_run_id="0" * 32)
        t0, worst = time.monotonic(), 0.0
        while time.monotonic() - t0 < 10.0:  # a training step every 50 ms for 10 s
            t = time.monotonic()
            tracker.log_metrics({"train/loss": 1.0}, step=1)
            worst = max(worst, time.monotonic() - t)
            time.sleep(0.05)
        # Tries at ~0, 4 and 8 s (1 s hung + 3 s back-off each); an unrefreshed gate would try on every call
        # after the first back-off, about once per second.
        assert 2 <= proxy.connections <= 4
        assert worst < 0.5  # a hung request takes 1 s: none ran on this thread
        t = time.monotonic()
        tracker.end("FAILED")  # tries again within its budget, then gives up: bounded by it and one request
        assert time.monotonic() - t < tracking.END_WAIT_SECONDS + 1 + 1
    finally:
        proxy.stop()


def test_a_batch_in_flight_while_the_cap_drops_old_points_removes_only_what_was_sent(monkeypatch):
    monkeypatch.setattr(tracking, "MAX_BUFFERED", 5)
    buf = tracking.PointBuffer()
    buf.append([("loss", float(i), 0, i) for i in range(4)])
    start, batch = buf.peek(3)  # points 0-2 go to the server...
    assert [p[3] for p in batch] == [0, 1, 2]
    buf.append([("loss", float(i), 0, i) for i in range(4, 7)])  # ...while the cap drops points 0 and 1
    buf.sent(start, len(batch))
    assert [p[3] for p in buf.points] == [3, 4, 5, 6]  # not 5, 6: points 3 and 4 were never sent
    assert buf.logged == 7
    start, batch = buf.peek(10, before=5)  # only the points logged before a call queued after point 4
    assert start == 3 and [p[3] for p in batch] == [3, 4]


def test_metrics_logged_before_end_reach_the_store_before_the_run_ends(tmp_path, monkeypatch):
    """A real SQLite store; the client's calls are recorded in the order the background thread makes them.
    The first metrics call is held until everything else (a tag, more metrics, the end) is queued, so the
    thread sees them in one pass, as when it is busy with a slow request."""
    from mlflow.tracking import MlflowClient

    calls, release = [], threading.Event()
    log_batch, set_tag, set_terminated = MlflowClient.log_batch, MlflowClient.set_tag, MlflowClient.set_terminated

    def recorded_log_batch(self, run_id, metrics=(), **kw):
        if metrics:
            if not calls:
                release.wait(10)
            calls.append(("metrics", sorted({m.step for m in metrics})))
        return log_batch(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", recorded_log_batch)
    monkeypatch.setattr(MlflowClient, "set_tag",
                        lambda self, *a, **kw: (calls.append(("tag",)), set_tag(self, *a, **kw))[1])
    monkeypatch.setattr(MlflowClient, "set_terminated",
                        lambda self, *a, **kw: (calls.append(("end",)), set_terminated(self, *a, **kw))[1])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.Tracker(TrackingConfig(uri=uri, experiment="order"), enabled=True)
    run_id = tracker.start(params={"a": 1}, tags={})
    tracker.log_metrics({"train/loss": 3.0}, step=1)
    tracker.set_tag("phase", "late")
    tracker.log_metrics({"train/loss": 2.0}, step=2)
    tracker.log_metrics({"train/loss": 1.0}, step=3)
    threading.Timer(0.5, release.set).start()
    tracker.end("FINISHED")
    assert calls == [("metrics", [1]), ("tag",), ("metrics", [2, 3]), ("end",)]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FINISHED" and client.get_run(run_id).data.tags["phase"] == "late"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]


@pytest.mark.slow
def test_end_retries_a_failed_send_within_its_budget(mlflow_server, monkeypatch):
    """The server still hangs when the job ends and answers a second later: end() tries again and everything
    arrives (run, params, metrics, end status), instead of giving up at the first failure."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 600.0)  # no retry of its own before end()
    monkeypatch.setattr(tracking, "START_WAIT_SECONDS", 0.5)
    from mlflow.tracking import MlflowClient

    port = mlflow_server()
    proxy = HangThenForward()
    try:
        tracker = tracking.Tracker(TrackingConfig(uri=f"http://127.0.0.1:{proxy.port}", experiment="late"),
                                   enabled=True)
        assert tracker.start(params={"a": 1}, tags={}) is None
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        seen = proxy.connections

        def recover_once_end_tried():  # recovering closes the held request: end()'s try fails, the next works
            while proxy.connections == seen:
                time.sleep(0.05)
            proxy.recover(port)

        threading.Thread(target=recover_once_end_tried, daemon=True).start()
        t = time.monotonic()
        tracker.end("FINISHED")
        assert time.monotonic() - t < tracking.END_WAIT_SECONDS
    finally:
        proxy.stop()
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [1]


@pytest.mark.slow
def test_a_recipe_waits_for_its_parent_run_on_a_slow_server(mlflow_server, tmp_path, monkeypatch):
    """The server answers only after start() has given up waiting: the recipe still gets its parent run (the
    stages nest under its id), records it, and the run is one, ended, and reused by the next recipe run."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "START_WAIT_SECONDS", 0.5)
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 600.0)  # only the wait's own retries
    from mlflow.tracking import MlflowClient

    port = mlflow_server()
    proxy = HangThenForward()
    r = recipe.Recipe(name="slow", output_dir=str(tmp_path / "out"),
                      tracking=TrackingConfig(uri=f"http://127.0.0.1:{proxy.port}", experiment="recipe"))
    try:
        threading.Timer(2.0, proxy.recover, args=(port,)).start()  # after START_WAIT_SECONDS
        parent = recipe._parent_run(r)
        assert parent is not None
        assert recipe._parent_run(r) == parent  # reused, not made again
    finally:
        proxy.stop()
    assert json.loads((tmp_path / "out" / "recipe_run.json").read_text()) == {"mlflow_run_id": parent}
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    (run,) = client.search_runs([client.get_experiment_by_name("recipe").experiment_id])
    assert run.info.run_id == parent and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "recipe" and run.data.params["recipe"] == "slow"


def test_a_recipe_whose_server_never_answers_stops_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "START_WAIT_SECONDS", 0.5)
    monkeypatch.setattr(tracking, "RUN_WAIT_SECONDS", 2.0)
    monkeypatch.setattr(tracking, "END_WAIT_SECONDS", 1.0)
    proxy = HangThenForward()
    r = recipe.Recipe(name="dead", output_dir=str(tmp_path / "out"),
                      tracking=TrackingConfig(uri=f"http://127.0.0.1:{proxy.port}", experiment="recipe"))
    try:
        with pytest.raises(SystemExit, match="did not create the recipe's parent run within 2 s"):
            recipe._parent_run(r)
    finally:
        proxy.stop()
    assert not (tmp_path / "out" / "recipe_run.json").exists()


def test_a_resumed_run_with_changed_settings_goes_on_logging(tmp_path):
    """MLflow refuses a new value for a logged param: on resume the changed ones become tags, new ones are
    logged, and the metrics and the end status still arrive (a refused call used to hold up everything)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrackingConfig(uri=uri, experiment="resume")
    first = tracking.Tracker(cfg, enabled=True)
    run_id = first.start(params={"train.steps": 2, "optim.lr": 0.1}, tags={})
    first.log_metrics({"train/loss": 3.0}, step=1)
    first.end("KILLED")
    again = tracking.Tracker(cfg, enabled=True)
    assert again.start(params={"train.steps": 4, "optim.lr": 0.1, "train.eval_interval": 2}, tags={},
                       resume_run_id=run_id) == run_id
    again.log_metrics({"train/loss": 2.0}, step=3)
    again.end("FINISHED")
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "2", "optim.lr": "0.1", "train.eval_interval": "2"}
    assert run.data.tags["resumed.train.steps"] == "2 -> 4"
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 3]


def test_a_call_the_server_refuses_is_dropped_and_the_rest_is_sent(tmp_path, capsys):
    """A refusal (here: a run that is not in this store) is not an outage: retrying cannot help."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.Tracker(TrackingConfig(uri=uri, experiment="refused"), enabled=True)
    tracker.start(params={"a": 1}, tags={}, resume_run_id="0" * 32)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert tracker.flush(tries=1)  # nothing left queued: every refused call was dropped, not retried
    tracker.end("FINISHED")
    err = capsys.readouterr().err
    assert "the server refused log params" in err and "the server refused log metrics" in err
    assert "unreachable" not in err
    assert MlflowClient(tracking_uri=uri).search_experiments()  # the store itself works
