"""The HTTP edge of a real server, probed over raw sockets: framing (request smuggling), bodies that end early
or go over the limit, and slow clients. Each probe gets its exact status, never a partial prediction, and the
next good request is served. Runs on the host's current gunicorn and, through the seed-pins suite, on the
images' gunicorn 20.1.0."""

import json
import socket
import time
from typing import List, NamedTuple, Optional

import pytest
import requests

from support import FIXTURE_MODELS, Server, runtime_env

LIMIT = 2 * 1024 * 1024
READ_TIMEOUT = 2


class Answer(NamedTuple):
    status: int
    body: bytes
    closed: bool  # the server closed the connection after this answer
    extra: bytes  # anything sent after it: a second (smuggled) request's answer


@pytest.fixture(scope="module")
def server():
    env = runtime_env(MD_MAX_REQUEST_BYTES=str(LIMIT), MD_READ_TIMEOUT=str(READ_TIMEOUT), MD_WORKERS="1")
    with Server(FIXTURE_MODELS / "sums_columns", env=env) as running:
        yield running.wait_ready()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_response(sock: socket.socket, head_only: bool = False) -> Answer:
    """One Content-Length framed response (its head alone for HEAD), nothing read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise AssertionError("connection closed without an answer: {!r}".format(data[:200]))
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0 if head_only else int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                          if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return Answer(int(head.split(b" ", 2)[1]), body[:length], False, body[length:])


def read_answer(sock: socket.socket, wait: float = 10) -> Answer:
    """One response, then whatever follows until the server closes or goes quiet."""
    sock.settimeout(wait)
    answer = read_response(sock)
    sock.settimeout(1)
    extra, closed = answer.extra, False
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                closed = True
                break
            extra += part
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed = True
    return answer._replace(closed=closed, extra=extra)


def exchange(server: Server, raw: bytes, shut_write: bool = False) -> Answer:
    with connect(server) as sock:
        sock.sendall(raw)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        return read_answer(sock)


def post(headers: List[str], body: bytes = b"", content_type: str = "text/csv") -> bytes:
    lines = ["POST /predict HTTP/1.1", "Host: test", "Content-Type: " + content_type] + headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


CSV = b"a,b\n1,2\n3,4\n"
HIDDEN = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"


def assert_refused(answer: Answer, status: int, kind: str) -> None:
    assert answer.status == status, answer
    assert json.loads(answer.body)["error"] == kind, answer
    assert answer.closed and answer.extra == b"", "the connection must close with nothing after the refusal"


def assert_served_next(server: Server) -> None:
    response = requests.post(server.url + "/predict", data=CSV, headers={"Content-Type": "text/csv"}, timeout=10)
    assert response.status_code == 200 and response.json() == [{"total": 3}, {"total": 7}]


SMUGGLING = {
    "CL.TE": ["Content-Length: {cl}", "Transfer-Encoding: chunked"],
    "TE.CL": ["Transfer-Encoding: chunked", "Content-Length: {cl}"],
    "chunked, identity": ["Transfer-Encoding: chunked, identity", "Content-Length: {cl}"],
    "identity, chunked": ["Transfer-Encoding: identity, chunked", "Content-Length: {cl}"],
    "xchunked": ["Transfer-Encoding: xchunked", "Content-Length: {cl}"],
    "chunked;q=1": ["Transfer-Encoding: chunked;q=1", "Content-Length: {cl}"],
    "tab before chunked": ["Transfer-Encoding:\tchunked"],
    "vertical tab before chunked": ["Transfer-Encoding:\x0bchunked"],
    "two Transfer-Encodings": ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
    "folded Transfer-Encoding": ["Transfer-Encoding: identity", " chunked"],
    "Content-Length +": ["Content-Length: +{cl}"],
    "Content-Length underscore": ["Content-Length: 1_{cl}"],
    "Content-Length hex": ["Content-Length: 0x{cl}"],
    "two Content-Lengths": ["Content-Length: {cl}", "Content-Length: {cl}"],
}


@pytest.mark.parametrize("headers", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_ambiguous_framing_is_refused_before_any_route_and_the_connection_closed(server, headers):
    body = chunked(CSV)
    filled = [line.format(cl=len(body)) for line in headers]
    answer = exchange(server, post(filled, body + HIDDEN))
    assert_refused(answer, 400, "invalid_framing")
    assert_served_next(server)


def test_chunked_on_http_1_0_is_refused(server):
    raw = b"POST /predict HTTP/1.0\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(CSV)
    assert_refused(exchange(server, raw), 400, "invalid_framing")


@pytest.mark.parametrize("size_line", [b"0x0c", b"+c", b"0_c", b" c", b"c "], ids=repr)
def test_chunk_sizes_that_are_not_plain_hex_are_refused(server, size_line):
    body = size_line + b"\r\n" + CSV + b"\r\n0\r\n\r\n"
    assert_refused(exchange(server, post(["Transfer-Encoding: chunked"], body)), 400, "invalid_framing")
    assert_served_next(server)


def test_a_chunked_body_is_served_whole_across_many_chunks(server):
    rows = b"a,b\n" + b"".join(b"%d,1\n" % i for i in range(2000))
    answer = exchange(server, post(["Transfer-Encoding: chunked", "Connection: close"], chunked(rows, 7)))
    assert answer.status == 200, answer
    assert [row["total"] for row in json.loads(answer.body)] == [i + 1 for i in range(2000)]


def test_keep_alive_serves_the_next_request_after_a_whole_chunked_body(server):
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(post(["Transfer-Encoding: chunked"], chunked(CSV, 5)))
            sock.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = head.split(b"\r\n\r\n", 1)[1]
            while len(body) < length:
                body += sock.recv(65536)
            assert json.loads(body) == [{"total": 3}, {"total": 7}]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_that_ends_early_is_400_and_nothing_is_predicted(server, framing):
    rows = b"a,b\n" + b"1,2\n" * 500
    if framing == "length":
        raw = post(["Content-Length: {}".format(len(rows))], rows[: len(rows) // 2])
    else:
        raw = post(["Transfer-Encoding: chunked"], chunked(rows, 100)[:1000])
    assert_refused(exchange(server, raw, shut_write=True), 400, "incomplete_body")
    assert_served_next(server)


def test_a_declared_length_over_the_limit_is_413_without_reading_the_body(server):
    answer = exchange(server, post(["Content-Length: {}".format(LIMIT + 1)]))  # no body sent at all
    assert_refused(answer, 413, "payload_too_large")


@pytest.mark.parametrize("content_type", ["text/csv", "application/json"])
def test_a_chunked_body_over_the_limit_is_413_never_a_prediction_on_part_of_it(server, content_type):
    if content_type == "text/csv":
        rows = b"a,b\n" + b"1,2\n" * (LIMIT // 4 + 10)
    else:
        rows = json.dumps([{"a": 1, "b": 2}] * (LIMIT // 16)).encode()
    assert len(rows) > LIMIT
    raw = post(["Transfer-Encoding: chunked"], chunked(rows, 4096), content_type)
    assert_refused(exchange(server, raw), 413, "payload_too_large")
    assert_served_next(server)


def test_a_body_far_over_the_limit_is_cut_off_not_read(server):
    """The client keeps sending 50x the limit; the server answers 413 after the limit and closes, and the
    client's sending fails long before it has sent it all."""
    with connect(server) as sock:
        sock.sendall(post(["Transfer-Encoding: chunked"]))
        sent, refused = 0, False
        piece = chunked(b"1" * 60000)[:-5]  # one chunk, no last-chunk
        try:
            while sent < 50 * LIMIT:
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            refused = True
        assert refused, "the server read {} bytes of a body over its {} byte limit".format(sent, LIMIT)
        assert sent < 50 * LIMIT


@pytest.mark.parametrize("partial", [b"POST /predict HTTP/1.1\r\nHost: te", b"POST /predict HTTP/1.1\r\nHost: test\r\n"],
                         ids=["request line", "headers"])
def test_headers_that_do_not_arrive_in_time_get_408_and_close(server, partial):
    with connect(server) as sock:
        sock.sendall(partial)
        started = time.monotonic()
        answer = read_answer(sock, wait=READ_TIMEOUT + 10)
        waited = time.monotonic() - started
    assert_refused(answer, 408, "request_timeout")
    assert waited >= READ_TIMEOUT - 0.5, "the deadline runs from the first byte"
    assert_served_next(server)


def test_a_body_that_does_not_arrive_in_time_gets_408_and_close(server):
    with connect(server) as sock:
        sock.sendall(post(["Content-Length: 1000"], b"a,b\n1"))
        assert_refused(read_answer(sock, wait=READ_TIMEOUT + 10), 408, "request_timeout")


def test_a_slow_trickle_does_not_extend_the_deadline(server):
    with connect(server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\n")
        answer: Optional[Answer] = None
        for _ in range(READ_TIMEOUT * 10):
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            time.sleep(0.5)
            sock.settimeout(0.01)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    answer = read_answer(sock)
                    break
            except socket.timeout:
                pass
        assert answer is not None, "the server kept reading a request that trickled in for {} s".format(READ_TIMEOUT * 5)
    assert_refused(answer, 408, "request_timeout")


def test_an_idle_keep_alive_connection_is_closed_quietly(server):
    with connect(server) as sock:
        sock.settimeout(READ_TIMEOUT + 10)
        assert sock.recv(1) == b"", "an idle connection gets no 408, it is closed"


def test_slow_connections_leave_a_good_client_served(server):
    """Hundreds of connections stalled in their headers or their bodies, all open at once; a good client is
    served meanwhile (how fast is measured in bench/, not asserted here)."""
    stalled = []
    try:
        for i in range(300):
            sock = connect(server)
            sock.sendall(post(["Content-Length: 1000"], b"a,b\n") if i % 2 else b"POST /predict HTTP/1.1\r\nHost")
            stalled.append(sock)
        for _ in range(20):
            assert_served_next(server)
    finally:
        for sock in stalled:
            sock.close()


def send(server: Server, body: bytes, content_type: str = "application/json", path: str = "/predict",
         **headers: str) -> requests.Response:
    return requests.post(server.url + path, data=body, headers=dict(headers, **{"Content-Type": content_type}), timeout=30)


WIDE = 100000
MISTAKES = {
    "JSON nested 100,000 deep": (b"[" * 100000 + b"]" * 100000, "application/json", "MD_MAX_JSON_DEPTH (32)"),
    "a split column named by an object": (b'{"columns": [{}], "data": []}', "application/json", "column names must be"),
    "a split column named twice": (b'{"columns": ["a", "a"], "data": [[1, 2]]}', "application/json", "more than once: a"),
    "a CSV column named twice": (b"a,b,a\n1,2,3\n", "text/csv", "more than once: a"),
    "a CSV 100,000 columns wide": (
        ",".join("c{}".format(i) for i in range(WIDE)).encode() + b"\n" + b",".join([b"1"] * WIDE) + b"\n",
        "text/csv", "MD_MAX_COLUMNS (10000)",
    ),
    "records 100,000 columns wide": (
        json.dumps([{"c{}".format(i): 1 for i in range(WIDE)}]).encode(), "application/json", "MD_MAX_COLUMNS (10000)",
    ),
}


@pytest.mark.parametrize("body, content_type, fragment", list(MISTAKES.values()), ids=list(MISTAKES))
def test_client_mistakes_are_400_with_a_short_message_naming_them(server, body, content_type, fragment):
    response = send(server, body, content_type)
    assert response.status_code == 400, response.text[:300]
    assert fragment in response.json()["message"]
    assert len(response.content) < 2000
    assert_served_next(server)


def test_a_compressed_body_is_415_naming_the_encoding(server):
    import gzip

    response = send(server, gzip.compress(CSV), "text/csv", **{"Content-Encoding": "gzip"})
    assert response.status_code == 415
    assert response.json()["message"] == "Content-Encoding 'gzip' is not supported; send the body uncompressed"


def test_a_missing_column_list_is_bounded():
    """The 422 for a model.yaml with many inputs names the first few and counts the rest."""
    from md_runtime.errors import ColumnMismatchError

    message = ColumnMismatchError(["c{:05d}".format(i) for i in range(WIDE)], ()).message
    assert message.endswith("c00019 and 99980 more)")


def test_an_infinite_prediction_is_null_in_v2_json_never_a_bare_infinity(server):
    infer = {"inputs": [{"name": "a", "shape": [2], "datatype": "FP64", "data": [1e308, 1.0]},
                        {"name": "b", "shape": [2], "datatype": "FP64", "data": [1e308, 2.0]}]}
    response = requests.post(server.url + "/v2/models/sums_columns/infer", json=infer, timeout=30)
    assert response.status_code == 200, response.text
    assert json.loads(response.text, parse_constant=lambda name: pytest.fail("bare " + name))["outputs"][0]["data"] == [None, 3.0]


TCPI_DATA_SEGS_IN = 152  # its offset in Linux's struct tcp_info (4.6 and later)


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    if len(info) < TCPI_DATA_SEGS_IN + 4:
        pytest.skip("this kernel's tcp_info has no tcpi_data_segs_in")
    return int.from_bytes(info[TCPI_DATA_SEGS_IN:TCPI_DATA_SEGS_IN + 4], "little")


def test_a_small_response_reaches_the_client_in_one_segment_head_and_body_together(server):
    """gunicorn sends the head and then the body: two segments and two wake-ups of the client per small
    response. The runtime sends them together (worker.HeadWithBody); a body too large to copy goes after its
    head, whole."""
    rows = 20000
    exchanges = [
        (post(["Content-Length: {}".format(len(CSV))], CSV), 200, False),
        (b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n", 200, False),
        (b"HEAD /ready HTTP/1.1\r\nHost: test\r\n\r\n", 200, True),
        (post(["Content-Length: 5"], b"a,b\n1", "text/plain"), 415, False),
    ] * 5
    with connect(server) as sock:
        for raw, status, head_only in exchanges:
            before = data_segments_in(sock)
            sock.sendall(raw)
            answer = read_response(sock, head_only)
            assert answer.status == status and answer.extra == b""
            assert data_segments_in(sock) - before == 1, raw[:40]
        big = b"a,b\n" + b"1,2\n" * rows
        sock.sendall(post(["Content-Length: {}".format(len(big))], big))
        answer = read_response(sock)
    assert answer.status == 200 and json.loads(answer.body) == [{"total": 3}] * rows
