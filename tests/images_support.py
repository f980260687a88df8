"""Building and running the md-base images with podman for the `container` tests (.ci/containers sets podman up)."""

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, Optional, Tuple

import requests

from support import REPO

BULLSEYE = "localhost/md-debian-python:bullseye"  # made by .ci/containers with debootstrap: Python 3.9


class Podman:
    def __init__(self) -> None:
        if not shutil.which("podman"):
            raise RuntimeError(
                "podman is not installed: run `bash .ci/containers bullseye` as root, or leave the container tests "
                "out with MD_CONTAINER_TESTS=0"
            )
        if subprocess.run(["podman", "image", "exists", BULLSEYE]).returncode != 0:
            raise RuntimeError("no {} base image: run `bash .ci/containers bullseye`".format(BULLSEYE))

    def build(self, name: str, line: str = "exact") -> Tuple[str, str]:
        """build.sh through .ci/images, which adds what a build needs on these machines: (tag, size line)."""
        done = subprocess.run(["bash", str(REPO / ".ci" / "images"), "--line", line, name], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
        summary = done.stdout.strip().splitlines()[-1]
        return summary.split()[0], summary

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, "podman {} failed:\n{}{}".format(" ".join(args[:3]), done.stdout[-5000:], done.stderr[-5000:])
        return done

    def inspect(self, template: str, container: str) -> str:
        return self.run("container", "inspect", "--format", template, container).stdout.strip()

    def image_info(self, image: str) -> dict:
        return json.loads(self.run("image", "inspect", image).stdout)[0]


class Container:
    """`podman run -d` of an image; the test reaches it on 127.0.0.1:port and always removes it."""

    def __init__(self, podman: Podman, image: str, port: int, *flags: str, host_network: bool = False,
                 env: Optional[Dict[str, str]] = None, model: Optional[Path] = None, model_at: str = "/app/model",
                 args: Tuple[str, ...] = ()) -> None:
        self.podman, self.name, self.port = podman, "md-test-" + uuid.uuid4().hex[:10], port
        command = ["run", "-d", "--name", self.name]
        if host_network:  # to reach a test index on the host's 127.0.0.1; the server binds 127.0.0.1 too
            command += ["--network", "host", "-e", "MD_HOST=127.0.0.1", "-e", "MD_PORT={}".format(port)]
        else:
            command += ["-p", "127.0.0.1:{}:8080".format(port)]
        for key, value in (env or {}).items():
            command += ["-e", "{}={}".format(key, value)]
        if model is not None:
            command += ["-v", "{}:{}:ro".format(model, model_at)]
        podman.run(*command, *flags, image, *args)

    def url(self, path: str) -> str:
        return "http://127.0.0.1:{}{}".format(self.port, path)

    def logs(self) -> str:
        done = self.podman.run("logs", self.name, check=False)
        return done.stdout + done.stderr

    def wait_ready(self, deadline: float = 300) -> "Container":
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                if requests.get(self.url("/ready"), timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if self.podman.inspect("{{.State.Running}}", self.name) != "true":
                raise AssertionError("the container exited before it was ready:\n" + self.logs()[-8000:])
            time.sleep(0.5)
        raise AssertionError("not ready within {}s:\n{}".format(deadline, self.logs()[-8000:]))

    def exec(self, *command: str) -> str:
        return self.podman.run("exec", self.name, *command).stdout

    def remove(self) -> None:
        self.podman.run("rm", "-f", "-t", "0", self.name, check=False)


def owned_by(uid: int, path: Path) -> None:
    """Let the image's non-root user write a host directory mounted into it (the overlay cache)."""
    os.chown(str(path), uid, uid)
