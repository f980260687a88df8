"""Worker: gunicorn's gevent worker, with an HTTP edge that holds on every gunicorn the runtime runs under.

The images pin gunicorn 20.1.0, which frames requests loosely (it serves the hidden request of Content-Length
plus `Transfer-Encoding: chunked`, takes `int()` of `+10`, `1_0` and chunk sizes like `0x0a`), reads a request
for as long as its client likes, and drains an unread body before the next request on the connection. The
runtime owns its worker class, so the rules live here instead of in whichever gunicorn is installed:

- framing: a body is framed by `Transfer-Encoding: chunked` (exactly) or by a Content-Length of digits, never
  both; anything else is 400 before a route runs, and the connection is closed;
- bodies are read by the readers below: strict chunk sizes, and a body that ends early raises instead of
  reading short;
- a request (line, headers, body) must arrive within MD_READ_TIMEOUT once its first byte has: else 408;
- a body the app did not read to its end is never drained: the connection is closed instead;
- a response's head goes out with its body, in one send (gunicorn sends them apart: two packets, two wake-ups);
- on SIGTERM the worker keeps accepting for MD_DRAIN_SECONDS, not ready (503 on /ready) but serving;
- the worker's memory is watched between requests: past its share of the replica's memory (the master's
  plan, master.py) it finishes its requests and is replaced; an allocation that would take it past its share
  fails, and its request gets 507;
- the workers share the connections: one holding more than another leaves a new connection to it for a
  moment (OpenConnections, counts the master maps before it forks), so a burst opened at once loads them all.

gunicorn loads it as the worker class gunicorn_conf names, after gevent has patched the standard library.
"""

import contextlib
import functools
import importlib
import io
import json
import mmap
import re
import signal
import socket
import struct
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional

import gevent
from gevent.server import StreamServer
from gunicorn.http import message as gunicorn_message
from gunicorn.http import parser as gunicorn_parser
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers import ggevent

from .boot.resources import limit_data_growth, process_memory, restore_ieee_floats
from .boot.run_dir import MEMORY_FILE, RunDir
from .codecs import map_json_buffers
from .errors import FramingError, IncompleteBodyError, MdError, ReadTimeoutError, error_body
from .settings import read_settings

DIGITS = re.compile(r"[0-9]+")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
FRAMING_FIELD = re.compile(rb"(?i)(transfer-encoding|content-length):(.*)")
STRICT_VALUE = {b"transfer-encoding": re.compile(rb" *(?i:chunked) *"), b"content-length": re.compile(rb" *[0-9]+ *")}
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, or one trailer line
MAX_TRAILER_LINES = 100

# With several workers gunicorn lets each accept one connection per event-loop turn, so that no worker takes a
# whole burst. Under load a turn runs every ready request (30 ms at 64 connections), so the last of a burst of
# new connections waited dozens of turns: the first requests of 64 new keep-alive connections took up to
# 1.3 s, against 30 ms for the rest. A few per turn keeps that wait to a turn or two.
# Fewer per turn (2 or 4) shares a small burst between idle workers more evenly, but the tail at 64 connections
# grew to 6-15x p50; taking more once a worker is busy made the busiest worker take most of a burst.
ACCEPTS_PER_TURN = 8
# A worker holding more connections than another leaves a new one to the other for this long, then takes it:
# long enough for an idle worker to be scheduled on a loaded machine (at 5 ms, 6 of 8 went to one worker).
DEFER_SECONDS = 0.02
TCP_INFO = getattr(socket, "TCP_INFO", 11)
TCPI_UNACKED = 24  # its offset in struct tcp_info: 8 one-byte fields, then rto, ato, snd_mss, rcv_mss
COALESCE_BYTES = 64 * 1024  # a body up to this size is sent in one piece with the head
GUARD_SECONDS = 1.0  # how often a worker reads its memory (/proc/self/smaps_rollup, about 0.3 ms)


# --- framing ----------------------------------------------------------------------------------------------


def check_framing_fields(header_block: bytes) -> None:
    """The raw header lines, before gunicorn 20.1.0 strips any whitespace (vertical tab too) off their values."""
    for line in header_block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            raise FramingError("a header line continues the one before it (obsolete line folding)")
        field = FRAMING_FIELD.fullmatch(line)
        if field is not None and not STRICT_VALUE[field.group(1).lower()].fullmatch(field.group(2)):
            raise FramingError("{} is {!r}".format(field.group(1).decode(), field.group(2).decode("latin-1")[:40]))


def _values(headers: List[Any], name: str) -> List[str]:
    return [value.strip(" ") for field, value in headers if field == name]


def body_reader(request: Any) -> "BodyReader":
    """The one framing decision: chunked, or Content-Length, or no body at all."""
    encodings = _values(request.headers, "TRANSFER-ENCODING")
    lengths = _values(request.headers, "CONTENT-LENGTH")
    if encodings and lengths:
        raise FramingError("the request has both Content-Length and Transfer-Encoding")
    if encodings:
        if len(encodings) > 1 or encodings[0].lower() != "chunked":
            raise FramingError("Transfer-Encoding is {!r}, not exactly 'chunked'".format(", ".join(encodings)[:40]))
        if request.version < (1, 1):
            raise FramingError("HTTP/1.0 has no chunked bodies")
        return ChunkedBody(request.unreader)
    if len(lengths) > 1 or (lengths and not DIGITS.fullmatch(lengths[0])):
        raise FramingError("Content-Length is {!r}".format(", ".join(lengths)[:40]))
    return LengthBody(request.unreader, int(lengths[0]) if lengths else 0)


class BodyReader(io.RawIOBase):
    """A request body read from gunicorn's unreader (what arrived past the headers, then the socket)."""

    def __init__(self, unreader: Any) -> None:
        super().__init__()
        self.unreader = unreader
        self.complete = False
        self.received = 0

    def readable(self) -> bool:
        return True

    def _arrived(self) -> bytes:
        data = self.unreader.read()
        if not data:
            raise IncompleteBodyError(self.received, self._declared())
        return bytes(data)

    def _take(self, buffer: Any, most: int) -> int:
        data = self._arrived()
        size = min(len(data), len(buffer), most)
        buffer[:size] = data[:size]
        self.unreader.unread(data[size:])
        self.received += size
        return size

    def _declared(self) -> Optional[int]:
        return None


class LengthBody(BodyReader):
    def __init__(self, unreader: Any, length: int) -> None:
        super().__init__(unreader)
        self.length = length
        self.complete = length == 0

    def readinto(self, buffer: Any) -> int:
        if self.complete:
            return 0
        size = self._take(buffer, self.length - self.received)
        self.complete = self.received == self.length
        return size

    def _declared(self) -> Optional[int]:
        return self.length


class ChunkedBody(BodyReader):
    def __init__(self, unreader: Any) -> None:
        super().__init__(unreader)
        self.left_in_chunk = 0

    def readinto(self, buffer: Any) -> int:
        if self.complete:
            return 0
        if self.left_in_chunk == 0:
            self.left_in_chunk = self._chunk_size()
            if self.left_in_chunk == 0:
                self._skip_trailers()
                self.complete = True
                return 0
        size = self._take(buffer, self.left_in_chunk)
        self.left_in_chunk -= size
        if self.left_in_chunk == 0 and self._line() != b"":
            raise FramingError("a chunk is longer than its size says")
        return size

    def _chunk_size(self) -> int:
        size = self._line().split(b";", 1)[0]
        if not CHUNK_SIZE.fullmatch(size):
            raise FramingError("chunk size {!r} is not hexadecimal digits".format(size.decode("latin-1")[:20]))
        return int(size, 16)

    def _skip_trailers(self) -> None:
        for _ in range(MAX_TRAILER_LINES):
            if self._line() == b"":
                return
        raise FramingError("more than {} trailer lines".format(MAX_TRAILER_LINES))

    def _line(self) -> bytes:
        buffered = b""
        while b"\r\n" not in buffered:
            if len(buffered) > MAX_CHUNK_LINE:
                raise FramingError("a chunk line is longer than {} bytes".format(MAX_CHUNK_LINE))
            buffered += self._arrived()
        line, _, rest = buffered.partition(b"\r\n")
        self.unreader.unread(rest)
        return line


class StrictRequest(gunicorn_message.Request):
    """gunicorn's request, framed by the rules above. Its body is a buffered BodyReader."""

    def parse_headers(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, bytes):
            check_framing_fields(data)
        return super().parse_headers(data, *args, **kwargs)

    def set_body_reader(self) -> None:
        self.body = io.BufferedReader(body_reader(self), buffer_size=64 * 1024)

    def should_close(self) -> bool:
        return not self.body.raw.complete or super().should_close()


# --- responses --------------------------------------------------------------------------------------------


class HeadWithBody:
    """A response's socket that holds the head (status line and headers) until the first body bytes, and sends
    them together: gunicorn sends the head on its own, so a small response took two sends, two packets and two
    wake-ups of the client. A large body goes after the head rather than be copied behind it."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._holding = False  # the next sendall is the head
        self._head: Optional[bytes] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def hold_next(self) -> None:
        self._holding = True

    def sendall(self, data: bytes, *flags: int) -> None:
        if self._holding:
            self._head, self._holding = bytes(data), False
            return
        if self._head is not None and len(data) <= COALESCE_BYTES:
            data, self._head = self._head + data, None
        self.flush()
        self._sock.sendall(data, *flags)

    def sendfile(self, *args: Any, **kwargs: Any) -> Any:
        self.flush()
        return self._sock.sendfile(*args, **kwargs)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._sock.sendall(head)


class OneSendResponse(gunicorn_wsgi.Response):
    """gunicorn's response (20.1 and current), its head sent with the first body bytes (HeadWithBody)."""

    def __init__(self, req: Any, sock: Any, cfg: Any) -> None:
        super().__init__(req, HeadWithBody(sock), cfg)

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        self.sock.hold_next()
        super().send_headers()  # its one sendall is held

    def close(self) -> None:
        super().close()
        self.sock.flush()


# --- deadlines --------------------------------------------------------------------------------------------


class DeadlineSocket:
    """The client's socket, its reads bounded. Waiting for a request, a read gives up after the keep-alive
    timeout and reads as a closed connection; once a request's first byte is in, the rest of it (headers and
    body) must arrive within the read timeout, or ReadTimeoutError."""

    def __init__(self, sock: Any, idle_timeout: float, read_timeout: float) -> None:
        self._sock = sock
        self._idle_timeout = idle_timeout
        self._read_timeout = read_timeout
        self._deadline: Optional[float] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv(self, size: int, *flags: int) -> bytes:
        waiting = self._deadline is None
        timeout = self._idle_timeout if self._deadline is None else self._deadline - time.monotonic()
        if timeout <= 0:
            raise ReadTimeoutError(self._read_timeout)
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(size, *flags)
        except socket.timeout:
            if waiting:
                return b""
            raise ReadTimeoutError(self._read_timeout) from None
        finally:
            self._sock.settimeout(None)
        if waiting and data:
            self._deadline = time.monotonic() + self._read_timeout
        return data

    def request_done(self) -> None:
        self._deadline = None


def error_response(exc: MdError) -> bytes:
    """A whole HTTP response for an error found before the app ran; the connection closes after it."""
    body = json.dumps(error_body(exc, "native")).encode()
    head = "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n"
    return head.format(exc.status_code, HTTPStatus(exc.status_code).phrase, len(body)).encode("latin-1") + body


# --- the worker -------------------------------------------------------------------------------------------


def _load_compiled_modules(package: Any) -> None:
    """Import every compiled module of `package` now: gevent 21.12 loads some only when first used (a queue, the
    c-ares resolver), and each turns flush-to-zero on again as it loads (-ffast-math)."""
    root = Path(package.__file__).parent
    for library in sorted(root.rglob("*.so")):
        parts = library.relative_to(root).parts
        name = ".".join((package.__name__,) + parts[:-1] + (parts[-1].split(".")[0],))
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


# --- balance ----------------------------------------------------------------------------------------------


class OpenConnections:
    """Each worker's open connections, in memory the master maps before it forks, so that every worker reads
    every count: one slot per live worker (-1 when free), written only by its worker, read without a lock (a
    count a moment old only moves one connection)."""

    SLOTS = 256

    def __init__(self) -> None:
        self.counts = memoryview(mmap.mmap(-1, 4 * self.SLOTS)).cast("i")  # shared, anonymous
        for slot in range(self.SLOTS):
            self.counts[slot] = -1

    def assign(self, taken: Iterable[Optional[int]]) -> Optional[int]:
        """In the master, before forking a worker: a free slot, or None past SLOTS workers (not balanced)."""
        used = set(taken)
        slot = next((slot for slot in range(self.SLOTS) if slot not in used), None)
        if slot is not None:
            self.counts[slot] = 0
        return slot

    def release(self, slot: Optional[int]) -> None:
        if slot is not None:
            self.counts[slot] = -1

    def at_its_share(self, slot: int, waiting: int) -> bool:
        """This worker holds its share of the connections open and `waiting` to be accepted, and another holds
        fewer: the next is the other's. A burst is shared at once, not one connection per round of deferring."""
        counts = [count for count in self.counts.tolist() if count >= 0]
        mine = self.counts[slot]
        share = -(-(sum(counts) + waiting) // len(counts))  # rounded up
        return mine >= share and any(count < mine for count in counts)


def accept_queue(listener: Any) -> int:
    """The connections waiting in a listening TCP socket's accept queue: Linux reports them as TCP_INFO's
    tcpi_unacked for a listening socket. 0 where it cannot be read (a unix socket, another system)."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
    except OSError:
        return 0
    return struct.unpack_from("I", info, TCPI_UNACKED)[0] if len(info) >= TCPI_UNACKED + 4 else 0


class _FairAcceptServer(StreamServer):
    """gevent's server, accepting so that the workers share the connections: a worker holding more than
    another leaves a new connection to it for DEFER_SECONDS (every worker is woken by each connection, and the
    first to accept gets it), and takes it if it is still waiting."""

    _max_accept = StreamServer.max_accept  # gevent's default (100) when gunicorn leaves it alone: one worker
    started: List["_FairAcceptServer"] = []  # this worker's, so that a recycled worker stops accepting at once
    connections: Optional[OpenConnections] = None
    slot: Optional[int] = None
    _deferred = False  # the connection waiting was left to the others once

    def do_read(self) -> Any:
        if self._defers():
            self.stop_accepting()
            self._timer = self.loop.timer(DEFER_SECONDS)
            self._timer.start(self._start_accepting_if_started)
            return None
        accepted = super().do_read()
        if accepted and self.connections is not None and self.slot is not None:
            self.connections.counts[self.slot] += 1  # now, not once its greenlet runs: a turn accepts several
        return accepted

    def _defers(self) -> bool:
        """Whether to leave the waiting connection to a worker holding fewer, this one holding its share: once,
        then the next connection is taken however long the timer took to fire (a busy worker's loop turns take tens of milliseconds). A
        deadline in time instead deferred the same connection again and again under load."""
        if self._deferred:
            self._deferred = False
            return False
        self._deferred = self.connections is not None and self.slot is not None and \
            self.connections.at_its_share(self.slot, accept_queue(self.socket))
        return self._deferred

    def start(self) -> None:
        super().start()
        self.started.append(self)

    @property
    def max_accept(self) -> int:
        return self._max_accept

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        self._max_accept = max(value, ACCEPTS_PER_TURN)


@contextlib.contextmanager
def entry_points_read_once() -> Iterator[None]:
    """Current gevent reads every installed package's entry points (looking for its plugins) once per module it
    patches: patching the rest in a worker read them 25 times, 0.15 s of each worker's start. No package is
    installed while it patches. (gevent 21.12 asks pkg_resources, which reads them once.)"""
    from importlib import metadata

    original = metadata.entry_points
    metadata.entry_points = functools.lru_cache(maxsize=None)(original)  # type: ignore[assignment]
    try:
        yield
    finally:
        metadata.entry_points = original


class GeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker with the framing and deadlines above, accepting up to ACCEPTS_PER_TURN
    connections per turn."""

    read_timeout = 30.0
    drain_seconds = 0.0
    memory_share_mib: Optional[float] = None  # what the worker may hold: past it allocations fail (507)
    memory_recycle_mib: Optional[float] = None  # past it the worker is replaced (boot.sizing.recycle_mib)

    def init_process(self) -> None:
        settings = read_settings()
        self.read_timeout, self.drain_seconds = settings.read_timeout, settings.drain_seconds
        plan = RunDir(settings.metrics_dir).read_record(MEMORY_FILE) if settings.metrics_dir is not None else None
        self.memory_share_mib = (plan or {}).get("worker_share_mib")
        self.memory_recycle_mib = (plan or {}).get("worker_recycle_mib")
        gunicorn_parser.RequestParser.mesg_class = StrictRequest  # type: ignore[misc]  # every request it parses
        gunicorn_wsgi.Response = OneSendResponse  # type: ignore[misc]  # every response it makes
        super().init_process()

    def _core(self) -> Any:
        return getattr(getattr(self, "wsgi", None), "extensions", {}).get("md_runtime")  # None while booting

    def guard_memory(self, core: Any, recycle_mib: Optional[float]) -> None:
        """Between requests, once a second: report this worker's private memory, and near its share stop
        accepting, finish the requests in flight and exit (the master forks a fresh worker)."""
        while self.alive:  # type: ignore[has-type]
            memory = process_memory()
            if memory is not None:
                core.metrics.worker_memory.set(memory.uss * 2 ** 20)
            if memory is not None and recycle_mib is not None and memory.uss > recycle_mib:
                self.log.warning("worker %s holds %.0f MiB, near its share of the replica's memory (%.0f of %.0f MiB): "
                                 "replacing it once its requests finish", self.pid, memory.uss, recycle_mib,
                                 self.memory_share_mib or 0)
                core.metrics.workers_recycled.labels("memory").inc()
                for server in _FairAcceptServer.started:  # gunicorn's loop would take up to a second more
                    server.stop_accepting()
                self.alive = False
                return
            gevent.sleep(GUARD_SECONDS)

    def init_signals(self) -> None:
        super().init_signals()
        # NOTE: through gevent's own watcher: a plain Python handler runs only once the main greenlet runs Python
        # code again, up to a second later in gunicorn 20.1.0's loop, and /ready must turn 503 at once.
        self._sigterm = gevent.signal_handler(signal.SIGTERM, self.handle_exit, signal.SIGTERM, None)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: /ready says 503 at once, but the listener keeps accepting and serving for the drain period,
        while load balancers take the replica out; then gunicorn's graceful stop (no new connections, in-flight
        requests finish)."""
        core = self._core()
        if core is None or not self.drain_seconds:
            super().handle_exit(sig, frame)
            return
        core.drain()
        self.log.info("draining for %g s (MD_DRAIN_SECONDS) before stopping", self.drain_seconds)
        gevent.spawn_later(self.drain_seconds, super().handle_exit, sig, frame)

    def patch(self) -> None:
        with entry_points_read_once():
            super().patch()
        if restore_ieee_floats():  # gevent turned flush-to-zero on: it will again as each compiled module loads
            _load_compiled_modules(gevent)
            restore_ieee_floats()
            # NOTE: a greenlet switch saves and restores the CPU's floating-point mode, and the hub (whose
            # mode every request's greenlet starts from) was made before: reset it in there too
            gevent.get_hub().loop.run_callback(restore_ieee_floats)

    def run(self) -> None:
        ggevent.StreamServer = _FairAcceptServer  # type: ignore[misc]  # run() builds its servers from this name
        _FairAcceptServer.connections = getattr(self, "open_connections", None)  # gunicorn_conf's pre_fork
        _FairAcceptServer.slot = getattr(self, "connection_slot", None)
        core, share = self._core(), self.memory_share_mib
        if core is not None:
            # NOTE: not gevent.sleep(0), which resumes by a callback: gevent's loop polls the sockets only after a
            # run of 50 callbacks, so busy connections went 50 requests (50 ms) ahead of a newly readable one. Nor
            # a timer: libev then blocks at least 1 ms in epoll when no socket is ready (the p50 of c=1 doubled).
            # An idle watcher runs once the loop has polled (without blocking) and found nothing more pressing.
            core.yield_turn = gevent.idle
            map_json_buffers()  # before the limit is set: it counts what is mapped, touched or not
            memory = process_memory()
            if share is not None and memory is not None:
                limit_data_growth(int((share - memory.uss) * 2 ** 20))  # a larger allocation fails: MemoryError, 507
            gevent.spawn(self.guard_memory, core, self.memory_recycle_mib)
        super().run()

    def timeout_ctx(self) -> Any:
        return contextlib.nullcontext()  # DeadlineSocket bounds the wait for the next request

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        idle = self.cfg.keepalive or self.read_timeout
        try:
            super().handle(listener, DeadlineSocket(client, idle, self.read_timeout), addr)
        finally:
            connections, slot = _FairAcceptServer.connections, _FairAcceptServer.slot
            if connections is not None and slot is not None:  # counted as _FairAcceptServer accepted it
                connections.counts[slot] -= 1

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            sock.request_done()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if not isinstance(exc, MdError):
            super().handle_error(req, client, addr, exc)
            return
        self.log.info("refused a request from %s: %s", addr[0] if addr else "-", exc.message)
        with contextlib.suppress(OSError):
            client.sendall(error_response(exc))
