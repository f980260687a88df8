"""Core: one worker's model behind every protocol. DataFrames in; predictions, explanations and metadata out.

It owns the worker's state (starting or ready, the loaded model, the batcher) and what every request gets
whatever protocol brought it: its turn on the event loop, a count of requests in flight for the batch
leader, timing and error counting, batching, and the selection of model.yaml's inputs. The HTTP adapters
in `app` only turn bytes into frames and frames into bytes around it; no flask here.
"""

import contextlib
import enum
import logging
import sys
import time
from typing import Any, Callable, ContextManager, Iterator, List, NamedTuple, Optional

import pandas as pd

from .batching import Batcher
from .errors import NotReadyError, OutOfMemoryError, PredictTimeoutError
from .loader import LoadedModel
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("md_runtime.core")

DEFAULT_BATCH_ROWS = 64  # when model.yaml says `batching: true`


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # stopping: still serving, no longer ready for new traffic


class Prediction(NamedTuple):
    output: pd.DataFrame
    dropped: List[str]  # request columns that are not model.yaml inputs, left out of predict's frame


class Core:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = State.STARTING
        self.model: Optional[LoadedModel] = None
        self.batcher: Optional[Batcher] = None
        self.in_flight = 0  # predict and explain requests this worker is handling (greenlets share it, no lock)
        self.yield_turn: Callable[[], Any] = lambda: time.sleep(0)  # the gevent worker sets gevent.idle

    def serve(self, model: LoadedModel) -> None:
        self.model = model
        self.batcher = batcher_for(self.settings, model, self.metrics.batched_requests.inc, lambda: self.in_flight,
                                   lambda: self.deadline("predict()"))
        self.metrics.model_load_seconds.set(model.load_seconds)
        self.state = State.READY

    def ready_model(self) -> LoadedModel:
        if self.model is None:
            raise NotReadyError(self.state.value)
        return self.model

    def check_ready(self) -> None:
        """For readiness probes: a draining worker still serves what reaches it, but is not ready for more."""
        if self.state is not State.READY:
            raise NotReadyError(self.state.value)

    def drain(self) -> None:
        self.state = State.DRAINING

    @contextlib.contextmanager
    def request(self, timer: Optional[ContextManager[None]] = None) -> Iterator[LoadedModel]:
        """One predict or explain request, decode to encode: counted, timed, and given its turn."""
        # NOTE: yield once per request. gunicorn's gevent worker reads the next keep-alive request without
        # yielding when it has already arrived, so under load a few connections were served over and over while
        # the others starved for seconds (p99 >> p50).
        self.in_flight += 1  # counted before yielding, so a batch leader knows this request is coming
        try:
            self.yield_turn()
            with timer or self.metrics.predict_timer():
                try:
                    yield self.ready_model()
                except MemoryError as exc:  # decoding or encoding past the worker's share of memory: 507, not 500
                    raise OutOfMemoryError("the request", exc) from exc
        finally:
            self.in_flight -= 1

    def predict(self, model: LoadedModel, frame: pd.DataFrame) -> Prediction:
        frame, dropped = model.select_inputs(frame)
        with self.deadline("predict()"):
            output = self.batcher.predict(frame) if self.batcher else model.predict_selected(frame)
        self.metrics.predict_rows.inc(len(frame))
        return Prediction(output, dropped)

    def explain(self, model: LoadedModel, name: str, frame: pd.DataFrame) -> Any:
        with self.deadline("explain_custom()"):
            return model.explain(name, frame)

    @contextlib.contextmanager
    def deadline(self, stage: str) -> Iterator[None]:
        """MD_REQUEST_TIMEOUT for a call that waits: gevent raises its Timeout (a BaseException, which
        package.py's own `except Exception` does not swallow) wherever the call yields to the event loop."""
        seconds = self.settings.request_timeout
        # NOTE: gevent as the worker imported it. Without it (the app in-process, `md-runtime check`) nothing
        # could interrupt a wait, and importing gevent 21.12 (the images' pin) would turn on flush-to-zero for
        # the whole process.
        gevent = sys.modules.get("gevent")
        if not seconds or gevent is None:
            yield
            return
        timeout = gevent.Timeout(seconds)
        timeout.start()
        try:
            yield
        except gevent.Timeout as exc:
            if exc is not timeout:
                raise
            log.warning("%s did not finish within %g s (MD_REQUEST_TIMEOUT): answered 504", stage, seconds)
            raise PredictTimeoutError(stage, seconds) from None
        finally:
            timeout.close()

    def explain_timer(self, name: str) -> ContextManager[None]:
        """Timed under the explanation's name if the model declares it: names a client makes up must not grow
        the metrics without bound."""
        known = (self.model.explanation_names() if self.model is not None else None) or []
        return self.metrics.explain_timer(name if name in known else "undeclared")


def batcher_for(settings: Settings, model: LoadedModel, on_batch: Callable[[int], None],
                in_flight: Callable[[], int], deadline: Callable[[], ContextManager[None]]) -> Optional[Batcher]:
    """Batching when MD_MAX_BATCH_SIZE or model.yaml asks for it; model.yaml's own values win."""
    asked = dict(model.spec.batching or {})
    max_rows = int(asked.get("max_batch_size", settings.max_batch_size or DEFAULT_BATCH_ROWS))
    if not settings.max_batch_size and model.spec.batching is None:
        return None
    delay = float(asked.get("max_delay_ms", settings.max_batch_delay_ms))
    log.info("batching: up to %d rows per predict, waiting at most %.1f ms", max_rows, delay)
    return Batcher(model.predict_selected, max_rows, delay, on_batch, in_flight, deadline)

