"""Test helpers: a real `md-runtime serve` process on a free 127.0.0.1 port, started and always stopped."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import requests

REPO = Path(__file__).resolve().parent.parent
FIXTURE_MODELS = Path(__file__).resolve().parent / "fixtures" / "models"


def fixture_package(name: str) -> str:
    """The package.py source of tests/fixtures/models/NAME, for a test that builds its model directory around it."""
    return (FIXTURE_MODELS / name / "package.py").read_text()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def runtime_env(**extra: str) -> Dict[str, str]:
    """The test process's environment without MD_* leftovers, plus `extra`. Servers stop at once on SIGTERM
    (MD_DRAIN_SECONDS=0) unless a test asks for the drain."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MD_") and k not in ("PORT", "WEB_CONCURRENCY")}
    env["MD_DRAIN_SECONDS"] = "0"
    env.update(extra)
    return env


def md_runtime(
    *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 120, python: str = sys.executable,
    cwd: Optional[Path] = None, input: Optional[str] = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "md_runtime.cli", *args],
        env=env or runtime_env(),
        cwd=None if cwd is None else str(cwd),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Server:
    """`md-runtime serve MODEL_DIR` as a subprocess in its own process group."""

    def __init__(self, model_dir: Path, *flags: str, env: Optional[Dict[str, str]] = None, python: str = sys.executable) -> None:
        self.port = free_port()
        self.url = "http://127.0.0.1:{}".format(self.port)
        self.log = tempfile.TemporaryFile(mode="w+")
        argv: List[str] = [python, "-m", "md_runtime.cli", "serve", str(model_dir)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.process = subprocess.Popen(
            argv, env=env or runtime_env(), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        if self.log.closed:
            return self._final_output
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, deadline: float = 90.0) -> "Server":
        """Poll /ready; fail with the server's own output if it exits or never gets ready."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError("server exited with {}:\n{}".format(self.process.returncode, self.output()))
            try:
                if requests.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("server not ready after {}s:\n{}".format(deadline, self.output()))

    def workers(self) -> List[int]:
        """The master's child processes, from /proc (the images have no pgrep)."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == self.process.pid:
                children.append(int(stat.parent.name))
        return sorted(children)

    def wait_for_workers(self, count: int, but_not: Sequence[int] = ()) -> List[int]:
        """The workers, once there are `count` of them and none of `but_not`: /ready answers as soon as the first
        is ready, and gunicorn forks the others one by one."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = self.workers()
            if len(workers) == count and not set(workers) & set(but_not):
                return workers
            time.sleep(0.1)
        raise AssertionError("not {} workers: {}\n{}".format(count, self.workers(), self.output()))

    def wait_exit(self, timeout: float = 90.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if not self.log.closed:
            self._final_output = self.output()
            self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kwargs)
