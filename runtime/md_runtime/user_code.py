"""User code: every call into package.py runs inside user_code(), part of the loader stage.

A failure is logged with its traceback trimmed to the model directory's frames, and raised as a typed error
whose message names the call (`predict() raised ValueError: ...`); clients never see a stack.
"""

import contextlib
import logging
import traceback
from pathlib import Path
from typing import Iterator, Optional, Type

from .errors import OutOfMemoryError, UserCodeError

log = logging.getLogger("md_runtime.user_code")


@contextlib.contextmanager
def user_code(stage: str, error: Type[UserCodeError] = UserCodeError, model_dir: Optional[Path] = None) -> Iterator[None]:
    """Run package.py code: log its traceback (trimmed to package.py frames) and raise a typed error."""
    try:
        yield
    except MemoryError as exc:  # the worker's share of the replica's memory (boot.resources.limit_data_growth)
        log.error("%s ran out of memory: %s", stage, exc)
        raise OutOfMemoryError(stage, exc) from exc
    except Exception as exc:
        log.error("%s raised:\n%s", stage, _trimmed_traceback(exc, model_dir))
        raise error(stage, exc) from exc


def _trimmed_traceback(exc: BaseException, model_dir: Optional[Path]) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if model_dir is not None:
        inside = str(model_dir.resolve())
        mine = [f for f in frames if f.filename.startswith(inside)]
        frames = traceback.StackSummary.from_list(mine or frames[-1:])
    return "".join(traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)).rstrip()
