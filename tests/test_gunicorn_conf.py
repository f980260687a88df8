"""gunicorn_conf: gevent patches the standard library before anything else imports it."""

import subprocess
import sys

from support import runtime_env

PROBE = """
import sys
import md_runtime.gunicorn_conf as conf
from gevent import monkey
assert monkey.is_module_patched("socket") and monkey.is_module_patched("ssl") and monkey.is_module_patched("threading")
for module in ("os", "signal", "subprocess"):
    assert not monkey.is_module_patched(module), "the master must reap its workers itself: " + module
from md_runtime import worker
assert conf.worker_class == "md_runtime.worker.GeventWorker" and conf.workers == 3 and conf.bind == ["127.0.0.1:9123"]
server = worker._FairAcceptServer(("127.0.0.1", 0), handle=lambda *args: None)
assert server.max_accept == 100, "one worker keeps gevent's default"
server.max_accept = 1  # what gunicorn sets when there are several workers
assert server.max_accept == worker.ACCEPTS_PER_TURN > 1, server.max_accept
from gunicorn.config import Config
cfg = Config()
cfg.set("logconfig_dict", conf.logconfig_dict)
# gunicorn's own logger would build the access line's atoms here and fail on the missing response
conf.Logger(cfg).access(None, None, {}, 0.0)
print("ok")
"""


def test_gevent_patches_first_and_config_comes_from_settings_with_fair_accepts_and_no_unread_access_lines():
    result = subprocess.run(
        [sys.executable, "-W", "error::gevent.monkey.MonkeyPatchWarning", "-c", PROBE],
        env=runtime_env(MD_WORKERS="3", MD_HOST="127.0.0.1", MD_PORT="9123"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "MonkeyPatchWarning" not in result.stderr
