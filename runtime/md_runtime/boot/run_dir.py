"""The run directory: the one place a server's processes share files.

It holds Prometheus' multiprocess files, the records of the overlay in use and of the master's memory
measurements (for /info, /metrics and the workers' memory guard), the
first failed worker's one-line reason (which the master prints last), and gunicorn's control socket. It is
made, or cleaned, before gunicorn starts, and removed when the master exits if md-runtime made it (a
directory the user named keeps its metrics). Standard library and errors only.
"""

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from ..errors import StartupError

MARKER = ".made-by-md-runtime"  # in a directory md-runtime made itself, so may remove
OVERLAY_FILE = "overlay.json"  # boot's record of the requirements.txt overlay
MEMORY_FILE = "memory.json"  # the master's: preloading, what it measured, each worker's share
BOOT_ERROR_FILE = "boot-error.txt"
CONTROL_SOCKET = "gunicorn.ctl"
MAX_UNIX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with the terminating NUL


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, named: Optional[Path]) -> "RunDir":
        with _writable(named):
            return cls._create(named)

    @classmethod
    def _create(cls, named: Optional[Path]) -> "RunDir":
        """A fresh temporary directory, or the one the user named, emptied of a previous server's files
        (stale metrics would pollute /metrics; a stale boot error would be reported again)."""
        if named is None:
            run_dir = cls(Path(tempfile.mkdtemp(prefix="md-runtime-metrics-")))
            (run_dir.path / MARKER).touch()
            return run_dir
        run_dir = cls(named)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        for stale in list(run_dir.path.glob("*.db")) + [run_dir.path / name for name in (OVERLAY_FILE, MEMORY_FILE, BOOT_ERROR_FILE)]:
            if stale.is_file():
                stale.unlink()
        return run_dir

    @property
    def control_socket(self) -> Optional[Path]:
        """gunicorn's control socket, or None where its path would be too long for a unix socket."""
        path = self.path / CONTROL_SOCKET
        return path if len(str(path).encode()) <= MAX_UNIX_SOCKET_PATH else None

    def write_record(self, name: str, record: Optional[Dict[str, Any]]) -> None:
        with _writable(self.path):
            (self.path / name).write_text(json.dumps(record))

    def read_record(self, name: str) -> Optional[Dict[str, Any]]:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def record_boot_error(self, message: str) -> bool:
        """True for the first worker to fail; the others fail the same way and should not report it again."""
        try:
            with open(str(self.path / BOOT_ERROR_FILE), "x") as out:
                out.write(message)
            return True
        except FileExistsError:
            return False

    def read_boot_error(self) -> Optional[str]:
        path = self.path / BOOT_ERROR_FILE
        return path.read_text() if path.is_file() else None

    def remove_if_temporary(self) -> None:
        if (self.path / MARKER).is_file():
            shutil.rmtree(str(self.path), ignore_errors=True)


@contextlib.contextmanager
def _writable(named: Optional[Path]) -> Iterator[None]:
    """An OSError here is a start-up failure the user fixes with MD_METRICS_DIR: say so in one line."""
    try:
        yield
    except OSError as exc:
        where = "MD_METRICS_DIR ({})".format(named) if named is not None else "the temporary directory ({})".format(
            tempfile.gettempdir())
        raise StartupError("{} cannot be written: {}; set MD_METRICS_DIR to a writable directory".format(
            where, exc.strerror or exc)) from None
