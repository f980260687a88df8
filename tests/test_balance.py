"""Balance across workers, on a real server: connections opened at once are shared between the workers (each
worker accepts only while it holds no more connections than another, worker.OpenConnections), so that a few
long-lived keep-alive connections, as a proxy in front of a replica keeps, load every worker."""

import http.client
import json
import re
import socket
import threading
import time

from support import FIXTURE_MODELS, Server

ROW = json.dumps([{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}])
STARTS, CONNECTIONS, REQUESTS_EACH = 4, 8, 40


def requests_by_worker(server: Server) -> dict:
    """Each worker's own count of the requests it answered (md_worker_requests, one series per pid)."""
    text = server.get("/metrics").text
    return {pid: float(value) for pid, value in re.findall(r'md_worker_requests\{pid="(\d+)"\} ([0-9.e+]+)', text)}


def wait_until_every_worker_serves(server: Server, workers: int) -> None:
    """Each worker reports its memory as it starts serving: then it is listening."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(re.findall(r'md_worker_memory_bytes\{pid="\d+"\}', server.get("/metrics").text)) == workers:
            return
        time.sleep(0.05)
    raise AssertionError("not every worker serves:\n" + server.output())


def keep_alive_clients(server: Server) -> list:
    """CONNECTIONS connections opened at once, each then sending REQUESTS_EACH predictions back to back; the
    statuses."""
    statuses: list = []
    opened = threading.Barrier(CONNECTIONS)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        opened.wait()
        connection.connect()
        for _ in range(REQUESTS_EACH):
            connection.request("POST", "/predict", ROW, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_two_workers_share_eight_keep_alive_connections_opened_at_once(iris_model_dir):
    for start in range(STARTS):
        with Server(iris_model_dir, "--workers", "2").wait_ready() as server:
            wait_until_every_worker_serves(server, 2)
            before = requests_by_worker(server)
            statuses = keep_alive_clients(server)
            after = requests_by_worker(server)
        assert statuses == [200] * CONNECTIONS * REQUESTS_EACH
        served = {pid: after[pid] - before.get(pid, 0) for pid in after}
        shares = sorted(count / sum(served.values()) for count in served.values())
        assert len(shares) == 2 and 0.35 <= shares[0] <= shares[1] <= 0.65, (start, served)


HOT_CONNECTIONS, PIPELINED, PROBES = 4, 400, 15
SEQ = re.compile(rb'"seq":(\d+)')


def test_a_request_on_a_quiet_connection_waits_for_each_busy_connection_once_not_for_dozens(tmp_path):
    """One worker; HOT_CONNECTIONS connections each pipeline PIPELINED requests, so that the next is always
    there, and a probe connection sends one request at a time. Between a probe's sending and its answer, the
    worker serves each busy connection about once: each request yields through the event loop, which polls
    the sockets. Yielding by a callback (gevent.sleep(0)) served ~50 busy requests first (gevent's loop checks
    its time only every 50 callbacks): 50 ms at 1 ms a request, the p99 of every keep-alive load. The worker
    yields with gevent.idle (see GeventWorker.run)."""
    model = FIXTURE_MODELS / "counts_predictions"
    with Server(model, "--workers", "1").wait_ready() as server:
        seen = [0]
        body = b'[{"a": 1}]'
        request = b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body), body)

        def hot() -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
                sock.sendall(request * PIPELINED)
                received, answers = b"", 0
                while answers < PIPELINED:
                    chunk = sock.recv(65536)
                    assert chunk, "the server closed a busy connection"
                    received += chunk
                    found = [int(n) for n in SEQ.findall(received)]
                    answers += len(found)
                    seen[0] = max([seen[0]] + found)
                    received = received[received.rfind(b"}]") + 2:] if found else received

        threads = [threading.Thread(target=hot) for _ in range(HOT_CONNECTIONS)]
        for thread in threads:
            thread.start()
        waits = []
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as probe:
            while seen[0] < 100:
                time.sleep(0.001)
            for _ in range(PROBES):
                before = seen[0]
                probe.sendall(request)
                answer = b""
                while not SEQ.search(answer):
                    answer += probe.recv(65536)
                waits.append(int(SEQ.search(answer).group(1)) - before - 1)
        for thread in threads:
            thread.join()
    waits.sort()
    assert waits[-1] <= 7 * HOT_CONNECTIONS, "busy requests served before a probe's: {}".format(waits)
