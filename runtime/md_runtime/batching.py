"""Batching: concurrent requests in one worker gathered into one predict call, and split back in order.

Opt-in per model (MD_MAX_BATCH_SIZE, or `batching:` in model.yaml): a model whose output for a row depends
on the other rows of its frame must not be batched. The first request to arrive starts a batch leader: it
waits at most the delay (or until the batch is full), takes the waiting requests whose columns match the
first, and predicts once; every request, the first too, waits for its own share. If that call fails, each
request of the batch is predicted on its own, so a request with bad data fails alone. Uses `threading`,
which gunicorn's gevent workers have patched into greenlets.
"""

import contextlib
import logging
import threading
import time
from typing import Callable, ContextManager, List, Optional

import numpy as np
import pandas as pd

from .errors import PredictTimeoutError

log = logging.getLogger("md_runtime.batching")

Predict = Callable[[pd.DataFrame], pd.DataFrame]


class _Pending:
    __slots__ = ("frame", "done", "result", "error")

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.done = threading.Event()
        self.result: Optional[pd.DataFrame] = None
        self.error: Optional[BaseException] = None


class Batcher:
    def __init__(self, predict: Predict, max_rows: int, max_delay_ms: float,
                 on_batch: Callable[[int], None] = lambda requests: None,
                 in_flight: Optional[Callable[[], int]] = None,
                 deadline: Callable[[], ContextManager[None]] = contextlib.nullcontext) -> None:
        self.predict_one = predict
        self.deadline = deadline  # around each predict call: a batch stuck waiting must not hold up the next
        self.on_batch = on_batch  # told how many requests each shared predict call answered
        # requests the worker is handling (decoding, queued or predicting); None: always wait the full delay
        self.in_flight = in_flight
        self.max_rows = max_rows
        self.max_delay = max_delay_ms / 1000.0
        self.lock = threading.Lock()
        self.queue: List[_Pending] = []
        self.leading = False
        self.arrived = threading.Event()  # set when a request joins the queue: the leader looks again

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        if len(frame) >= self.max_rows:
            return self.predict_one(frame)  # already a batch: nothing to gain by waiting
        pending = _Pending(frame)
        with self.lock:
            self.queue.append(pending)
            lead = not self.leading
            self.leading = True
        self.arrived.set()
        if lead:  # in a greenlet of its own: a request that gives up waiting (MD_REQUEST_TIMEOUT) stops no batch
            threading.Thread(target=self._lead, daemon=True).start()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _lead(self) -> None:
        """Gather for at most the delay, then predict every queued request, batch after batch."""
        deadline = time.monotonic() + self.max_delay
        while time.monotonic() < deadline and self._worth_waiting():
            self.arrived.clear()
            if self._worth_waiting():  # NOTE: checked again after clear(), so an arrival between the two is seen
                self.arrived.wait(max(deadline - time.monotonic(), 0))
        while True:
            with self.lock:
                batch = self._take_batch()
                if not batch:
                    self.leading = False
                    return
            self._run(batch)

    def _worth_waiting(self) -> bool:
        """Room in the batch, and requests on their way to it (a lone request is predicted at once)."""
        with self.lock:
            rows, queued = sum(len(p.frame) for p in self.queue), len(self.queue)
        coming = self.in_flight() > queued if self.in_flight is not None else True
        return rows < self.max_rows and coming

    def _take_batch(self) -> List[_Pending]:
        """The oldest request and the ones after it with the same columns, up to max_rows (lock held)."""
        if not self.queue:
            return []
        first = self.queue[0]
        batch: List[_Pending] = []
        rows = 0
        for pending in list(self.queue):
            same = list(pending.frame.columns) == list(first.frame.columns)
            if same and (not batch or rows + len(pending.frame) <= self.max_rows):
                batch.append(pending)
                rows += len(pending.frame)
                self.queue.remove(pending)
        return batch

    def _run(self, batch: List[_Pending]) -> None:
        if len(batch) > 1:
            try:
                with self.deadline():
                    merged = self.predict_one(pd.concat([p.frame for p in batch], ignore_index=True))
                self.on_batch(len(batch))
                for pending, result in zip(batch, _split(merged, [len(p.frame) for p in batch])):
                    pending.result = result
                    pending.done.set()
                return
            except PredictTimeoutError as exc:  # predicting each alone would wait as long again, each
                self._fail(batch, exc)
                return
            except Exception as exc:  # noqa: BLE001 - one request's bad data: find it by predicting each alone
                log.warning("a predict call batching %d requests failed (%s: %s); predicting each alone",
                            len(batch), type(exc).__name__, exc)
        for pending in batch:
            try:
                with self.deadline():
                    pending.result = self.predict_one(pending.frame)
            except BaseException as exc:  # noqa: BLE001 - handed to that request's own greenlet
                pending.error = exc
            pending.done.set()

    @staticmethod
    def _fail(batch: List[_Pending], error: BaseException) -> None:
        for pending in batch:
            pending.error = error
            pending.done.set()


def _split(merged: pd.DataFrame, sizes: List[int]) -> List[pd.DataFrame]:
    """Consecutive pieces of `sizes` rows, each indexed from 0 like an output of its own."""
    bounds = np.cumsum([0] + sizes)
    dtypes = set(merged.dtypes)
    if len(dtypes) == 1 and isinstance(next(iter(dtypes)), np.dtype):  # one numpy dtype: slicing the array
        values = merged.to_numpy()  # costs half of what iloc + reset_index do, for each piece
        return [pd.DataFrame(values[a:b], columns=merged.columns) for a, b in zip(bounds[:-1], bounds[1:])]
    return [merged.iloc[a:b].reset_index(drop=True) for a, b in zip(bounds[:-1], bounds[1:])]
