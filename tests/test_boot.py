"""boot: the launch plan made in-process (settings -> overlay -> workers -> run directory -> environment), and
the run directory, the one place a server's processes share files."""

import json

import pytest

from md_runtime.boot import GUNICORN_APP, make_plan
from md_runtime.boot.run_dir import RunDir
from md_runtime.errors import ModelDirError
from md_runtime.settings import SERIALIZED_ENV, read_settings
from support import FIXTURE_MODELS


def test_the_plan_resolves_workers_run_directory_and_environment(tmp_path):
    settings = read_settings({}, model_dir=str(FIXTURE_MODELS / "sums_columns"), workers="3", memory_check="false",
                             metrics_dir=str(tmp_path / "run"))
    plan = make_plan(settings, {"PATH": "/usr/bin", "OMP_NUM_THREADS": "7"})
    assert plan.settings.workers == 3 and plan.run_dir.path == tmp_path / "run" and plan.overlay is None
    assert plan.argv[-1] == GUNICORN_APP and plan.python == plan.argv[0]
    assert plan.env["PATH"] == "/usr/bin" and plan.env["OMP_NUM_THREADS"] == "7", "the user's own values are kept"
    assert plan.env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "run")
    assert plan.run_dir.read_record("overlay.json") is None and (tmp_path / "run" / "overlay.json").is_file()
    child = read_settings(plan.env)  # what gunicorn and its workers read back: the same settings
    assert child == plan.settings
    assert json.loads(plan.env[SERIALIZED_ENV])["workers"] == "3"


def test_the_plan_refuses_a_model_directory_without_package_py(tmp_path):
    with pytest.raises(ModelDirError, match="no package.py found"):
        make_plan(read_settings({}, model_dir=str(tmp_path)), {})


def test_a_temporary_run_directory_is_removed_and_a_named_one_kept_but_cleaned(tmp_path):
    temporary = RunDir.create(None)
    temporary.remove_if_temporary()
    assert not temporary.path.exists()
    named = tmp_path / "named"
    named.mkdir()
    (named / "counter_1.db").write_text("stale")
    (named / "boot-error.txt").write_text("an old failure")
    run_dir = RunDir.create(named)
    assert list(named.iterdir()) == [] and run_dir.read_boot_error() is None
    run_dir.remove_if_temporary()
    assert named.is_dir(), "a directory the user named is never removed"


def test_only_the_first_boot_error_is_recorded(tmp_path):
    run_dir = RunDir.create(tmp_path)
    assert run_dir.record_boot_error("package.py: no get_model() function") is True
    assert run_dir.record_boot_error("the same failure in a second worker") is False
    assert run_dir.read_boot_error() == "package.py: no get_model() function"


@pytest.mark.parametrize("hard, expected", [(20000, 4096 + 128), (2000, 2000)])
def test_the_open_files_limit_is_raised_for_the_workers_connections_as_far_as_the_hard_limit_allows(hard, expected):
    import resource
    import subprocess
    import sys

    current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if current_hard != resource.RLIM_INFINITY and current_hard < hard:
        pytest.skip("this machine's hard limit on open files is below {}".format(hard))
    probe = ("import resource; from md_runtime.boot.resources import raise_open_files_limit; "
             "print(raise_open_files_limit(4096), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    assert done.stdout.split() == [str(expected)] * 2, done.stderr
    assert ("each worker holds at most about 1872 connections" in done.stderr) == (hard == 2000)
