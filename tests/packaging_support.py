"""Test packages without PyPI: wheels written by hand, and a PEP 503 index on 127.0.0.1 that can misbehave."""

import base64
import hashlib
import os
import re
import site
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Sequence


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_wheel(directory: Path, name: str, version: str, requires: Sequence[str] = (), payload: int = 0) -> Path:
    """A pure-Python wheel whose module reports its version: `import mdtest_lib; mdtest_lib.__version__`;
    `payload` bytes of random data make it as big as a real library."""
    dist = name.replace("-", "_")
    files: Dict[str, bytes] = {
        "{}/__init__.py".format(dist): '__version__ = "{}"\n'.format(version).encode(),
        "{}-{}.dist-info/METADATA".format(dist, version): "".join(
            ["Metadata-Version: 2.1\nName: {}\nVersion: {}\n".format(name, version)]
            + ["Requires-Dist: {}\n".format(r) for r in requires]
        ).encode(),
        "{}-{}.dist-info/WHEEL".format(dist, version): b"Wheel-Version: 1.0\nGenerator: md-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if payload:
        files["{}/payload.bin".format(dist)] = os.urandom(payload)
    record_name = "{}-{}.dist-info/RECORD".format(dist, version)
    records = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append("{},sha256={},{}".format(path, digest, len(data)))
    files[record_name] = ("\n".join(records + [record_name + ",,"]) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "{}-{}-py3-none-any.whl".format(dist, version)
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


class LocalIndex:
    """A simple index of `wheels` on a free 127.0.0.1 port. The first `fail_first` requests get a 503 and the
    first `reset_first` get their connection closed unanswered; each answer waits `delay` seconds. `requests`
    lists every path asked for."""

    def __init__(self, wheels: Sequence[Path], fail_first: int = 0, reset_first: int = 0, port: int = 0,
                 delay: float = 0.0) -> None:
        self.wheels = {w.name: w for w in wheels}
        self.fail_first, self.reset_first, self.delay = fail_first, reset_first, delay
        self.requests: List[str] = []
        self.lock = threading.Lock()
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                index.serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = "http://127.0.0.1:{}/simple/".format(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalIndex":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> int:
        return sum(1 for path in self.requests if path.startswith("/files/"))

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append(handler.path)
            count = len(self.requests)
        time.sleep(self.delay)
        if count <= self.reset_first:
            handler.close_connection = True
            handler.connection.close()
            return
        if count <= self.reset_first + self.fail_first:
            return self._send(handler, 503, b"busy", "text/plain")
        if handler.path.startswith("/files/"):
            wheel = self.wheels.get(handler.path[len("/files/"):])
            return self._send(handler, 200, wheel.read_bytes(), "application/octet-stream") if wheel else self._send(handler, 404, b"", "text/plain")
        project = normalize(handler.path[len("/simple/"):].strip("/"))
        links = [
            '<a href="/files/{0}#sha256={1}">{0}</a>'.format(name, hashlib.sha256(path.read_bytes()).hexdigest())
            for name, path in sorted(self.wheels.items())
            if normalize(name.split("-")[0]) == project
        ]
        if not links:
            return self._send(handler, 404, b"not found", "text/plain")
        self._send(handler, 200, ("<html><body>" + "\n".join(links) + "</body></html>").encode(), "text/html")

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def make_failing_sdist(directory: Path, name: str, version: str) -> Path:
    """A source distribution whose in-tree build backend raises, so pip fails to build it (no index needed)."""
    import io
    import tarfile

    root = "{}-{}".format(name.replace("-", "_"), version)
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": "def build_wheel(*args, **kwargs):\n    raise RuntimeError('this package cannot be built')\n\n"
                      "def build_sdist(*args, **kwargs):\n    raise RuntimeError('this package cannot be built')\n",
        "PKG-INFO": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n".format(name, version),
    }
    directory.mkdir(parents=True, exist_ok=True)
    sdist = directory / "{}.tar.gz".format(root)
    with tarfile.open(str(sdist), "w:gz") as archive:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo("{}/{}".format(root, path))
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return sdist


def venv_over_this_environment(venv: Path, with_pip: bool = False) -> str:
    """A venv whose own site-packages come first and this test environment's after them (a .pth file), as an
    overlay sees its base: what is installed into it shadows this environment, which stays untouched."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)] + ([] if with_pip else ["--without-pip"]), check=True)
    site_packages = venv / "lib" / "python{}.{}".format(*sys.version_info[:2]) / "site-packages"
    lines = ["import site; site.addsitedir({!r})".format(d) for d in site.getsitepackages()]
    (site_packages / "zz-test-environment.pth").write_text("\n".join(lines) + "\n")
    return str(venv / "bin" / "python")
