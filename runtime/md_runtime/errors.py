"""Errors: the one exception hierarchy of the runtime.

Every error a user can cause carries its HTTP status (for requests) and its exit code (for start-up), and
builds its message from its arguments: what failed, the value, and what to change. `app` maps these to
responses in exactly one place; `cli` maps them to exit codes.
"""

from typing import Dict, Iterable, Optional, Sequence

# gunicorn's own exit codes: its master halts instead of respawning workers that exit with them.
WORKER_BOOT_ERROR = 3
APP_LOAD_ERROR = 4


class MdError(Exception):
    """Base of every error the runtime reports to a user."""

    status_code = 500
    exit_code = WORKER_BOOT_ERROR
    kind = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- start-up -------------------------------------------------------------------------------------------


class SettingsError(MdError):
    kind = "invalid_setting"

    def __init__(self, variable: str, value: object, problem: str) -> None:
        super().__init__("{}={!r} is invalid: {}".format(variable, value, problem))
        self.variable = variable


class RequirementsError(MdError):
    """requirements.txt could not be installed, or broke the runtime's own dependencies."""

    kind = "requirements_error"


class MemoryLimitError(MdError):
    """The model does not fit in the replica's memory: said before the kernel's OOM killer says nothing."""

    kind = "memory_limit"

    def __init__(self, limit_mib: float, workers: int, asks: Sequence[int], measured: str, most_mib: int) -> None:
        """`asks`: the memory to deploy with for 1 worker and for `workers`; none when the load itself outgrew
        the limit, so that how much more it needs is not known here. `most_mib`: the most a deployment may have."""
        replica = "this replica has {:.0f} MiB for {} worker(s)".format(limit_mib, workers)
        if asks and asks[0] > most_mib:
            advice = "it needs about {} MiB, more than a deployment may have ({} MiB): make the model smaller".format(
                asks[0], most_mib)
        elif not asks:
            advice = ("raise memory above {:.0f} MiB; `md-runtime check MODEL_DIR` on a machine with more memory "
                      "prints the memory to ask for".format(limit_mib))
        else:
            advice = "deploy with memory={} (MiB) or more".format(asks[0])
            if workers > 1:
                advice += ", {} for all {} workers".format(asks[-1], workers)
        super().__init__("ModelServeError: the model does not fit: {}; {}; {}".format(measured, replica, advice))


class OutOfMemoryError(MdError):
    """A request's own allocation would take the worker past its share of the replica's memory."""

    status_code = 507
    kind = "out_of_memory"

    def __init__(self, stage: str, exc: BaseException) -> None:
        detail = str(exc).strip() or "an allocation failed"
        super().__init__("{} ran out of memory ({}): the request needs more than this worker's share of the "
                         "replica's memory; send fewer rows per request, or deploy with more memory".format(stage, detail))


class StartupError(MdError):
    """Something outside the model keeps the server from starting: a port, a directory."""

    kind = "startup_error"


class DeploymentError(MdError):
    """Deployment parameters outside what the platform allows."""

    kind = "invalid_deployment"
    exit_code = 2


class ModelLoadError(MdError):
    """package.py could not be imported or does not keep the contract."""

    exit_code = APP_LOAD_ERROR
    kind = "model_load_error"


class ModelDirError(ModelLoadError):
    def __init__(self, model_dir: object, problem: str) -> None:
        super().__init__("model directory {}: {}".format(model_dir, problem))


class ContractError(ModelLoadError):
    def __init__(self, what: str, fix: str) -> None:
        super().__init__("package.py: {}; {}".format(what, fix))


class VersionMismatchError(ModelLoadError):
    """The model's files were written by other library versions than the environment has."""

    def __init__(self, stage: str, advice: str) -> None:
        super().__init__("{} failed: {}".format(stage, advice))


class ModelSpecError(ModelLoadError):
    def __init__(self, path: object, problem: str) -> None:
        super().__init__("{}: {}".format(path, problem))


# --- requests ---------------------------------------------------------------------------------------------


class RequestError(MdError):
    status_code = 400
    kind = "bad_request"


class PayloadError(RequestError):
    kind = "invalid_payload"

    def __init__(self, fmt: str, problem: str) -> None:
        super().__init__("could not read the request body as {}: {}".format(fmt, problem))


class UnsupportedMediaTypeError(RequestError):
    status_code = 415
    kind = "unsupported_media_type"

    def __init__(self, content_type: str, supported: Iterable[str]) -> None:
        super().__init__(
            "Content-Type {!r} is not supported; send one of: {}".format(content_type, ", ".join(supported))
        )


class UnsupportedEncodingError(UnsupportedMediaTypeError):
    def __init__(self, encoding: str) -> None:
        RequestError.__init__(
            self, "Content-Encoding {!r} is not supported; send the body uncompressed".format(encoding[:40])
        )


class PayloadTooLargeError(RequestError):
    status_code = 413
    kind = "payload_too_large"

    def __init__(self, size: Optional[int], limit: int) -> None:
        got = "{} bytes".format(size) if size is not None else "the body"
        super().__init__(
            "{} exceeds the limit of {} bytes; send smaller batches or raise MD_MAX_REQUEST_BYTES".format(got, limit)
        )


class FramingError(RequestError):
    """A request whose length two parsers could read differently (request smuggling): refused, connection closed."""

    kind = "invalid_framing"

    def __init__(self, problem: str) -> None:
        super().__init__("{}; send either Content-Length (digits only) or Transfer-Encoding: chunked".format(problem))


class IncompleteBodyError(RequestError):
    kind = "incomplete_body"

    def __init__(self, got: int, declared: Optional[int]) -> None:
        expected = "the {} bytes declared".format(declared) if declared is not None else "its last chunk"
        super().__init__("the body ended after {} bytes, before {}; nothing was predicted".format(got, expected))


class ReadTimeoutError(RequestError):
    status_code = 408
    kind = "request_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(
            "the request did not arrive whole within {:g} s (MD_READ_TIMEOUT); nothing was predicted".format(seconds)
        )


NAMES_SHOWN = 20  # names a message lists before "and N more": a client may send 100,000 of them


def some_names(names: Sequence[object]) -> str:
    shown = ", ".join(str(name)[:100] for name in names[:NAMES_SHOWN])
    return shown + (" and {} more".format(len(names) - NAMES_SHOWN) if len(names) > NAMES_SHOWN else "")


class ColumnMismatchError(RequestError):
    status_code = 422
    kind = "column_mismatch"

    def __init__(self, missing: Iterable[str], unexpected: Iterable[str]) -> None:
        parts = []
        if missing:
            parts.append("missing columns: {}".format(some_names(sorted(missing))))
        if unexpected:
            parts.append("unexpected columns: {}".format(some_names(sorted(unexpected))))
        super().__init__("the input does not match model.yaml inputs ({})".format("; ".join(parts)))


class NotFoundError(RequestError):
    status_code = 404
    kind = "not_found"


class RoutingError(RequestError):
    """No route, or not this method: what the HTTP framework found before any route ran."""

    def __init__(self, status: int, name: str, description: str) -> None:
        super().__init__(description)
        self.status_code = status
        self.kind = name.lower().replace(" ", "_")


class PredictTimeoutError(MdError):
    status_code = 504
    kind = "predict_timeout"

    def __init__(self, stage: str, seconds: float) -> None:
        super().__init__(
            "{} did not finish within {:g} s (MD_REQUEST_TIMEOUT); the model may be waiting on something "
            "(a network call, a lock)".format(stage, seconds)
        )


class InternalError(MdError):
    """A bug of ours: answered 500, logged with its traceback."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__("internal error: {}: {}".format(type(exc).__name__, exc))


class NotReadyError(MdError):
    status_code = 503
    kind = "not_ready"

    def __init__(self, state: str) -> None:
        super().__init__("the model is not ready (state: {})".format(state))


# --- the model's own faults -------------------------------------------------------------------------------


class UserCodeError(MdError):
    """package.py raised. The traceback goes to the log, never to the client."""

    kind = "model_error"

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__("{} raised {}: {}".format(stage, type(exc).__name__, exc))
        self.stage = stage


class UserLoadError(UserCodeError):
    exit_code = APP_LOAD_ERROR
    kind = "model_load_error"


class ModelOutputError(MdError):
    kind = "invalid_model_output"

    def __init__(self, problem: str, stage: str = "predict()") -> None:
        super().__init__("{} {}".format(stage, problem))


# --- the error map ---------------------------------------------------------------------------------------
# Status and kind live on each class above (found by the MRO); a response's body takes its protocol's shape.

V2_PROTOCOL = "v2"


def error_body(exc: MdError, protocol: str) -> Dict[str, str]:
    """The Open Inference Protocol's `{"error": message}`, or ours: `{"error": kind, "message": message}`."""
    if protocol == V2_PROTOCOL:
        return {"error": exc.message}
    return {"error": exc.kind, "message": exc.message}


class CheckError(MdError):
    """`md-runtime check` found a mistake that serving would not catch on its own."""

    kind = "check_failed"


class AuditInputError(MdError):
    """`md-runtime audit` or `sbom` was given a file or directory it cannot read."""

    kind = "audit_input"
    exit_code = 2


class AdvisoriesFoundError(MdError):
    """`md-runtime audit --fail-on`: advisories at or above the threshold cover installed packages."""

    kind = "advisories_found"
    exit_code = 1
