"""Overrides: the model's environment. requirements.txt is installed into an overlay over the base environment.

The overlay is a venv (without pip of its own) whose site-packages comes first on sys.path and whose `.pth`
file adds the base environment's site directories after it. pip run in it sees the base packages as
installed, so it installs only what differs, and shadows a base package it upgrades instead of removing it
("outside environment"). The base is never modified; several overlays share one base.

Overlays are cached under MD_ENV_CACHE, keyed by requirements.txt, the model's wheels/, the interpreter and
the base environment's packages. They are built in a temporary directory and renamed when complete, under a
file lock, so replicas sharing a cache volume build each overlay once. Standard library only: this module
also runs inside a fresh overlay to check the runtime's own dependencies.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

from .errors import MdError, RequirementsError

log = logging.getLogger("md_runtime.overrides")

MANIFEST = "md-overlay.json"
PIP_LOG = "pip.log"
RUNTIME_DISTRIBUTION = "md-runtime"

# Most specific first: the first one found names the cause in the error message.
TRANSIENT = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"connection refused",
        r"connection reset|connectionreseterror|remotedisconnected|incompleteread|protocolerror",
        r"temporary failure in name resolution|name or service not known",
        r"read timed out|connecttimeout\w*|timed out[^\n]*",
        r"too many 5\d\d error responses|http error 5\d\d|\b5\d\d (server error|service unavailable)[^\n]*",
        r"newconnectionerror|max retries exceeded",
        r"connection aborted|brokenpipeerror|badstatusline",
        r"could not fetch url [^\n]*connection error[^\n]*",  # pip's words for any connection-level failure
    )
]
DISK_FULL = re.compile(r"No space left on device|\[Errno 28\]|Disk quota exceeded|\[Errno 122\]")
MISSING = re.compile(r"No matching distribution found for (\S+)")
AVAILABLE = re.compile(r"\(from versions: ([^)]*)\)")
CONFLICT = re.compile(r"ResolutionImpossible|conflicting dependencies|Cannot install ", re.IGNORECASE)
MALFORMED = re.compile(r"Invalid requirement: (.+)")
BUILD_FAILED = re.compile(r"subprocess-exited-with-error|metadata-generation-failed|Failed (?:to build|building wheel)")
# pip names the distribution in one of these, depending on its version and on the step that failed
BUILD_NAME = re.compile(r"(?:Failed to build|Failed building wheel for|Could not build wheels for) '?([A-Za-z0-9][\w.-]*)")
REQUIREMENT = re.compile(r"(?:Collecting|distribution found for|satisfies the requirement) (\S+)")


DISK_ADVICE = "free space there or point MD_ENV_CACHE at a bigger volume"
BACKOFF_CAP = 30.0  # seconds: the longest wait between two install attempts


class Overlay(NamedTuple):
    path: Path
    key: str
    from_cache: bool
    install_seconds: float
    attempts: int
    overrides: List[Tuple[str, str]]

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def requirements_file(model_dir: Path) -> Optional[Path]:
    """model_dir/requirements.txt when it asks for anything (comments and blank lines alone do not count)."""
    path = Path(model_dir) / "requirements.txt"
    if not path.is_file():
        return None
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return path if any(lines) else None


def base_fingerprint() -> str:
    """The interpreter and every distribution of the base environment, as one string."""
    from importlib import metadata

    names = sorted("{}=={}".format(d.metadata["Name"], d.version) for d in metadata.distributions())
    return "\n".join([sys.version, os.path.realpath(sys.executable)] + names)


def overlay_key(model_dir: Path, requirements: Path, offline: bool) -> str:
    digest = hashlib.sha256()
    for part in (requirements.read_bytes(), base_fingerprint().encode(), b"offline" if offline else b"online"):
        digest.update(part + b"\0")
    wheels = Path(model_dir) / "wheels"
    for wheel in sorted(wheels.glob("*")) if wheels.is_dir() else []:
        digest.update("{}:{}\0".format(wheel.name, wheel.stat().st_size).encode())
    return digest.hexdigest()[:32]


def prepare(model_dir: Path, cache: Path, retries: Optional[int], timeout: float, backoff: float,
            offline: bool) -> Optional[Overlay]:
    """The model's overlay, from the cache or built now; None when the model has no requirements.txt."""
    model_dir = Path(model_dir).resolve()  # pip runs with the model directory as its working directory
    requirements = requirements_file(model_dir)
    if requirements is None:
        return None
    key = overlay_key(model_dir, requirements, offline)
    target = Path(cache) / key
    deadline = time.monotonic() + timeout
    cached = _read_manifest(target, from_cache=True)
    if cached is not None:
        return cached
    try:
        Path(cache).mkdir(parents=True, exist_ok=True)
        with _locked(Path(cache) / (key + ".lock"), deadline):
            cached = _read_manifest(target, from_cache=True)  # another replica built it while we waited
            if cached is not None:
                return cached
            _remove_killed_builds(target)
            return _build(model_dir, requirements, target, deadline, retries, backoff, offline)
    except OSError as exc:
        raise cache_error(Path(cache), exc) from None


def cache_error(cache: Path, exc: OSError) -> RequirementsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RequirementsError("the disk holding MD_ENV_CACHE ({}) is full; {}".format(cache, DISK_ADVICE))
    return RequirementsError(
        "MD_ENV_CACHE ({}) cannot be written: {}; point MD_ENV_CACHE at a writable directory (it defaults to "
        "$XDG_CACHE_HOME or $HOME/.cache)".format(cache, exc.strerror or exc)
    )


def _remove_killed_builds(target: Path) -> None:
    """Builds of this overlay that a killed start left behind (we hold its lock, so none is running)."""
    for leftover in target.parent.glob(".build-{}-*".format(target.name)):
        log.info("removing %s, left by a start that was stopped while installing", leftover)
        shutil.rmtree(str(leftover), ignore_errors=True)


def _read_manifest(target: Path, from_cache: bool) -> Optional[Overlay]:
    try:
        doc = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    overrides = [(name, version) for name, version in doc["overrides"]]
    return Overlay(target, doc["key"], from_cache, doc["install_seconds"], doc["attempts"], overrides)


@contextlib.contextmanager
def _locked(path: Path, deadline: float) -> Iterator[None]:
    with open(str(path), "w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RequirementsError(
                        "timed out waiting for another replica to build the overlay ({}); raise MD_INSTALL_TIMEOUT".format(path)
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(model_dir: Path, requirements: Path, target: Path, deadline: float, retries: Optional[int], backoff: float,
           offline: bool) -> Overlay:
    building = Path(tempfile.mkdtemp(prefix=".build-{}-".format(target.name), dir=str(target.parent)))
    try:
        _create_venv(building)
        started = time.perf_counter()
        attempts = _install_with_retries(building, model_dir, requirements, deadline, retries, backoff, offline)
        seconds = time.perf_counter() - started
        _verify_in(building)
        overrides = _installed(building)
        manifest = {"key": target.name, "install_seconds": seconds, "attempts": attempts, "overrides": overrides}
        (building / MANIFEST).write_text(json.dumps(manifest))
        if target.exists():  # an incomplete leftover (it has no manifest); we hold the lock
            shutil.rmtree(str(target))
        os.rename(str(building), str(target))
    except BaseException:
        shutil.rmtree(str(building), ignore_errors=True)
        raise
    log.info("built overlay %s in %.1fs (%d attempt(s)): %s", target, seconds, attempts, _describe(overrides))
    return Overlay(target, target.name, False, seconds, attempts, [(n, v) for n, v in overrides])


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / "python{}.{}".format(*sys.version_info[:2]) / "site-packages"


def _create_venv(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True, capture_output=True)
    base_dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    lines = ["import site; site.addsitedir({!r})".format(d) for d in base_dirs]
    # NOTE: the name sorts after every package's own .pth, so the overlay's packages are set up first.
    (_site_packages(venv) / "zzz-md-base-environment.pth").write_text("\n".join(lines) + "\n")


def _pip_command(venv: Path, requirements: Path, model_dir: Path, offline: bool) -> List[str]:
    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    # NOTE: pip says why an index page failed only in its verbose log (on the console a 503 looks like a
    # missing version), so classify() reads that log; --retries 0 hands every network failure to our
    # classified retries, which go on until MD_INSTALL_TIMEOUT.
    command += ["--log", str(venv / PIP_LOG), "--progress-bar", "off", "--retries", "0", "-r", str(requirements)]
    wheels = Path(model_dir) / "wheels"
    if wheels.is_dir():
        command += ["--find-links", str(wheels)]
    if offline:
        command += ["--no-index"]
    return command


def _install_with_retries(venv: Path, model_dir: Path, requirements: Path, deadline: float, retries: Optional[int],
                          backoff: float, offline: bool) -> int:
    """One pip run per attempt. Transient failures are retried until MD_INSTALL_TIMEOUT (or MD_INSTALL_RETRIES,
    when set), waiting a random time up to a backoff that doubles from MD_INSTALL_BACKOFF to BACKOFF_CAP."""
    command = _pip_command(venv, requirements, model_dir, offline)
    verbose_log = venv / PIP_LOG
    started = time.monotonic()
    failure = None  # type: Optional[Failure]
    attempt = 0
    while True:
        attempt += 1
        logged_before = verbose_log.stat().st_size if verbose_log.exists() else 0
        output, returncode = _run_pip(command, model_dir, deadline - time.monotonic())
        if returncode == 0:
            log.info("pip output:\n%s", output)
            return attempt
        verbose = _read_from(verbose_log, logged_before)
        fetch_errors = [line for line in verbose.splitlines() if "Could not fetch URL" in line]
        log.warning("pip attempt %d failed:\n%s", attempt, "\n".join([output.rstrip()] + fetch_errors))
        if returncode is None and failure is not None:
            break  # the deadline cut this attempt short: the previous attempt's cause says more
        failure = classify(output + "\n" + verbose, requirements)
        if not failure.transient or (retries is not None and attempt > retries):
            break
        wait = random.uniform(0, min(backoff * 2 ** (attempt - 1), BACKOFF_CAP))
        time.sleep(min(wait, max(deadline - time.monotonic(), 0)))
        if time.monotonic() >= deadline:
            break
    assert failure is not None
    raise failure.error(attempt, time.monotonic() - started)


def _run_pip(command: List[str], model_dir: Path, remaining: float) -> Tuple[str, Optional[int]]:
    """pip's output and exit code; None as the code when MD_INSTALL_TIMEOUT ended the run."""
    if remaining <= 0:
        return "timed out: MD_INSTALL_TIMEOUT reached before pip could run", None
    try:
        done = subprocess.run(command, cwd=str(model_dir), capture_output=True, text=True, timeout=remaining)
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return text + "\ntimed out: MD_INSTALL_TIMEOUT reached while pip ran", None
    return done.stdout + done.stderr, done.returncode


def _read_from(path: Path, offset: int) -> str:
    if not path.exists():
        return ""
    with open(str(path), "rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", "replace")


class Failure(NamedTuple):
    transient: bool
    requirement: str
    cause: str

    def error(self, attempts: int, seconds: float) -> MdError:
        if self.transient:
            return RequirementsError(
                "requirements.txt: could not install {} after {} attempt(s) in {:.0f}s ({}); check the network and "
                "PIP_INDEX_URL, raise MD_INSTALL_RETRIES/MD_INSTALL_TIMEOUT, or ship wheels in MODEL_DIR/wheels with "
                "MD_OFFLINE=1".format(self.requirement, attempts, seconds, self.cause)
            )
        return RequirementsError("requirements.txt: {}".format(self.cause))


def classify(output: str, requirements: Path) -> Failure:
    """Transient (network, index 5xx, timeouts) or permanent (missing, conflict, malformed, build failure)."""
    named = REQUIREMENT.findall(output)
    requirement = named[-1] if named else _first_requirement(requirements)
    if DISK_FULL.search(output):  # pip fails in many ways on a full disk, some of them look like the network's
        return Failure(False, requirement, "the disk ran out of space while installing {}; {}".format(requirement, DISK_ADVICE))
    for pattern in TRANSIENT:
        transient = pattern.search(output)
        if transient:
            return Failure(True, requirement, transient.group(0).strip())
    for pattern, explain in (
        (MISSING, "{0} cannot be installed: no such package or version on the index" + _newest_here(output)
         + "; fix the line or add its wheel to MODEL_DIR/wheels"),
        (MALFORMED, "invalid requirement {0}; fix that line"),
        (CONFLICT, "the requirements conflict ({1}); loosen the conflicting pins"),
        (BUILD_FAILED, "{0} failed to build from source; pin a version with a wheel for this Python or add its wheel to MODEL_DIR/wheels"),
    ):
        match = pattern.search(output)
        if match:
            culprit = match.group(1) if match.groups() else None
            return Failure(False, requirement, explain.format(culprit or _built(output, requirement), _conflict_line(output)))
    return Failure(True, requirement, "pip failed: " + _last_error(output))


def _newest_here(output: str) -> str:
    """pip lists the versions it could use here; when there are some, the pin asked for one this Python has not
    (a model frozen on a newer Python, say): name the newest."""
    offered = AVAILABLE.search(output)
    versions = [v.strip() for v in offered.group(1).split(",") if v.strip()] if offered else []
    if not versions or versions == ["none"]:
        return ""
    return " for Python {}.{} (the newest it has is {})".format(sys.version_info[0], sys.version_info[1], versions[-1])


def _built(output: str, requirement: str) -> str:
    """The distribution whose build failed: pip's own words, else the last one it was collecting."""
    named = BUILD_NAME.search(output)
    return named.group(1).rstrip(".") if named else requirement


def _last_error(output: str) -> str:
    errors = [line.split("ERROR:", 1)[1].strip() for line in output.splitlines() if "ERROR:" in line]
    return errors[-1] if errors else "see the log for pip's output"


def _first_requirement(requirements: Path) -> str:
    lines = [line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines()] if requirements.is_file() else []
    return next((line for line in lines if line), requirements.name)


def _conflict_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if "conflict" in line.lower() or "requested" in line.lower()]
    return lines[0] if lines else "see the log for pip's explanation"


def _installed(venv: Path) -> List[Tuple[str, str]]:
    from importlib import metadata

    found = metadata.distributions(path=[str(_site_packages(venv))])
    return sorted((d.metadata["Name"], d.version) for d in found)


def _describe(overrides: List[Tuple[str, str]]) -> str:
    return ", ".join("{}=={}".format(n, v) for n, v in overrides) or "nothing new"


def _verify_in(venv: Path) -> None:
    """Run the dependency check inside the new overlay, where the overrides are what Python imports."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "md_runtime.overrides"], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines() or ["the runtime cannot start in the overlay"]
        raise RequirementsError(lines[-1])


def runtime_dependency_problems() -> List[str]:
    """The runtime's own dependencies that the environment no longer satisfies, one sentence each."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it; one of the two is always there where pip is
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef,assignment]

    problems = []
    for line in metadata.requires(RUNTIME_DISTRIBUTION) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            problems.append(
                "requirements.txt makes {} {} but md-runtime needs {}{}; change or remove that pin".format(
                    requirement.name, installed or "missing", requirement.name, requirement.specifier
                )
            )
    return problems


if __name__ == "__main__":
    found = runtime_dependency_problems()
    for problem in found:
        print(problem)
    sys.exit(3 if found else 0)
