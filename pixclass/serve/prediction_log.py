"""The service's prediction log writer: predictions wait in a bounded queue that one background
thread drains into the database in batches, so a slow or absent database never holds up an answer.

While the database is away the writer keeps the batch it holds and retries (backing off up to
`MAX_BACKOFF_S`); new predictions fill the queue meanwhile, and once it is full they are dropped
and counted. Every prediction is therefore either in the log or counted in
`pixclass_prediction_log_dropped_total` (by reason: `queue_full`; `rejected`, rows the database
refuses for good; `shutdown`, still unwritten when the service stopped). The database's schema
is brought to the current version by the writer's first successful connection when the service
started without reaching it."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time

from ..errors import first_line
from . import log_db

logger = logging.getLogger("pixclass.serve")

BATCH_ROWS = 500
# a refused connection costs little: retrying each second at most brings the log back soon after the database
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 1.0
# how long stopping the service may wait for the queue to reach the database
FLUSH_TIMEOUT_S = 10.0
DROP_REASONS = ("queue_full", "rejected", "shutdown")


class PredictionLog:
    """`dropped(reason, n)`, `written(n)` and `up(bool)` report to the service's metrics."""

    def __init__(self, engine, queue_size: int, *, written=None, dropped=None, up=None):
        self.engine, self.migrated = engine, False
        self.written = written or (lambda n: None)
        self.dropped = dropped or (lambda reason, n: None)
        self.up = up or (lambda ok: None)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._deadline = float("inf")  # for writing what is queued, once stopping
        # ids queued but not yet written or dropped, so feedback can wait for its prediction
        self._unwritten: set[str] = set()
        self._settled = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="pixclass-prediction-log", daemon=True)

    def start(self) -> None:
        """Bring the schema up to date and start writing. A database that cannot be reached now
        is not fatal (`pixclass serve` checked it once before starting its workers): the writer
        migrates when it first gets through."""
        try:
            log_db.migrate(self.engine)
            self.migrated = True
        except Exception as e:
            if not log_db.is_transient(e):
                raise
            logger.warning("prediction log unreachable at start-up, will retry: %s", first_line(e))
        self._thread.start()

    def stop(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Write what is queued (for at most `timeout_s` while the database is away), then stop."""
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join()
        self.engine.dispose()

    def submit(self, rows: list[dict]) -> None:
        """Queue rows (predictions.c's columns) without waiting; what does not fit is dropped."""
        for row in rows:
            with self._settled:
                self._unwritten.add(row["id"])
            try:
                self.queue.put_nowait(row)
            except queue.Full:
                self._settle([row])
                self.dropped("queue_full", 1)

    def wait_written(self, prediction_id: str, timeout_s: float) -> None:
        """Until the prediction is written (or dropped), or for at most `timeout_s`."""
        with self._settled:
            self._settled.wait_for(lambda: prediction_id not in self._unwritten, timeout_s)

    def _settle(self, rows: list[dict]) -> None:
        with self._settled:
            self._unwritten.difference_update(row["id"] for row in rows)
            self._settled.notify_all()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                self._write(batch)
            elif self._stop.is_set():
                return

    def _next_batch(self) -> list[dict]:
        try:
            batch = [self.queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < BATCH_ROWS:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[dict]) -> None:
        backoff = FIRST_BACKOFF_S
        while True:
            try:
                if not self.migrated:
                    log_db.migrate(self.engine)
                    self.migrated = True
                log_db.insert_predictions(self.engine, batch)
            except Exception as e:  # the writer must outlive anything the database does
                self.up(False)
                if not log_db.is_transient(e):
                    logger.error("prediction log: %d predictions refused: %s", len(batch), e)
                    self._give_up(batch, "rejected")
                    return
                if self._stop.is_set() and time.monotonic() >= self._deadline:
                    self._give_up(batch + self._drain(), "shutdown")
                    return
                logger.warning("prediction log unreachable, retrying in %.1f s: %s", backoff, first_line(e))
                if self._stop.is_set():
                    time.sleep(min(backoff, 0.5))
                else:
                    self._stop.wait(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            self.up(True)
            self.written(len(batch))
            self._settle(batch)
            return

    def _give_up(self, rows: list[dict], reason: str) -> None:
        self.dropped(reason, len(rows))
        self._settle(rows)

    def _drain(self) -> list[dict]:
        rows = []
        while True:
            try:
                rows.append(self.queue.get_nowait())
            except queue.Empty:
                return rows


def open_for_service(url_text: str, queue_size: int, registry) -> PredictionLog:
    """The log a service writes (not started, nothing connected yet), its metrics in `registry`."""
    from prometheus_client import Counter, Gauge

    written = Counter("pixclass_prediction_log_written_total", "predictions written to the log", registry=registry)
    dropped = Counter("pixclass_prediction_log_dropped_total",
                      "predictions that could not be logged (queue_full: the database was away or slow for "
                      "longer than the queue holds; rejected; shutdown)", ["reason"], registry=registry)
    up = Gauge("pixclass_prediction_log_up", "1 while the last write to the log succeeded", registry=registry)
    for reason in DROP_REASONS:  # shown at 0 from the start, so a rate over them is defined
        dropped.labels(reason)
    up.set(1)
    engine = log_db.open_engine(log_db.database_url(url_text))
    log = PredictionLog(engine, queue_size, written=written.inc,
                        dropped=lambda reason, n: dropped.labels(reason).inc(n), up=lambda ok: up.set(int(ok)))
    Gauge("pixclass_prediction_log_queue", "predictions waiting to be written", registry=registry).set_function(
        log.queue.qsize)
    return log


def prediction_rows(ids, request_id: str, names, contents, answers, latency_ms: float, model_digest: str,
                    image_limit_bytes: int | None) -> list[dict]:
    """The log's rows for one request's images; the image itself where `image_limit_bytes` allows
    (None: never). Hashes every image: run it off the event loop."""
    created_at = log_db.now()
    return [{"id": pid, "request_id": request_id, "created_at": created_at, "model_digest": model_digest,
             "filename": name[:255], "image_sha256": hashlib.sha256(data).hexdigest(), "image_bytes": len(data),
             "image": data if image_limit_bytes is not None and len(data) <= image_limit_bytes else None,
             "predicted": answer[0]["class"], "top_k": answer, "latency_ms": latency_ms}
            for pid, name, data, answer in zip(ids, names, contents, answers)]
