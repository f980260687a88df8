"""Logs: one logging configuration for gunicorn and the runtime, to stdout, as text or JSON lines."""

import json
import logging
import time
from typing import Any, Dict

from .settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback stays inside its event's line."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + ".%03dZ" % record.msecs,
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def logging_config(settings: Settings) -> Dict[str, Any]:
    """A dictConfig for logging.config and gunicorn's logconfig_dict."""
    formatter: Dict[str, Any] = (
        {"()": "md_runtime.logs.JsonFormatter"} if settings.log_format == "json" else {"format": TEXT_FORMAT}
    )
    level = settings.log_level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "md", "stream": "ext://sys.stdout"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"md": formatter},
        "handlers": {"stdout": handler},
        "root": {"level": level, "handlers": ["stdout"]},
        "loggers": {
            "md_runtime": {"level": level, "handlers": [], "propagate": True},
            "gunicorn.error": {"level": level, "handlers": ["stdout"], "propagate": False},
            # gunicorn writes access lines whenever a logconfig_dict is set, so the level is the switch.
            "gunicorn.access": {
                "level": "INFO" if settings.access_log else "WARNING",
                "handlers": ["stdout"],
                "propagate": False,
            },
        },
    }


def configure(settings: Settings) -> None:
    import logging.config

    logging.config.dictConfig(logging_config(settings))
