"""settings: MD_* variables, flags over env, foreign names, and errors that name the variable."""

from pathlib import Path

import pytest

from md_runtime.errors import SettingsError
from md_runtime.settings import describe, read_settings, to_environ


def test_defaults_serve_app_model_on_8080_with_workers_left_to_the_boot_plan():
    settings = read_settings({})
    assert settings.model_dir == Path("/app/model")
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.workers is None, "boot sizes the workers from the CPU quota and the memory"
    assert (settings.log_format, settings.log_level) == ("text", "info")


def test_md_variables_are_read_and_typed():
    settings = read_settings(
        {"MD_PORT": "9000", "MD_WORKERS": "3", "MD_ACCESS_LOG": "true", "MD_LOG_LEVEL": "DEBUG", "MD_MODEL_DIR": "/m"}
    )
    assert (settings.port, settings.workers, settings.access_log) == (9000, 3, True)
    assert settings.log_level == "debug"
    assert settings.model_dir == Path("/m")


def test_flags_override_env():
    assert read_settings({"MD_PORT": "9000"}, port="9100").port == 9100


def test_md_variable_wins_over_foreign_name():
    assert read_settings({"PORT": "7000", "MD_PORT": "9000"}).port == 9000
    assert read_settings({"PORT": "7000"}).port == 7000
    assert read_settings({"WEB_CONCURRENCY": "5"}).workers == 5


@pytest.mark.parametrize(
    "env,variable",
    [({"MD_PORT": "eighty"}, "MD_PORT"), ({"MD_PORT": "70000"}, "MD_PORT"), ({"MD_WORKERS": "0"}, "MD_WORKERS"),
     ({"MD_LOG_FORMAT": "xml"}, "MD_LOG_FORMAT"), ({"WEB_CONCURRENCY": "-1"}, "WEB_CONCURRENCY")],
)
def test_invalid_value_names_the_variable(env, variable):
    with pytest.raises(SettingsError) as caught:
        read_settings(env)
    assert caught.value.message.startswith(variable + "=")
    assert caught.value.exit_code == 3


def test_invalid_flag_names_the_flag():
    with pytest.raises(SettingsError) as caught:
        read_settings({}, timeout="soon")
    assert caught.value.message.startswith("--timeout='soon' is invalid")


def test_to_environ_rebuilds_the_same_settings():
    settings = read_settings({"MD_PORT": "9000", "MD_ACCESS_LOG": "1", "MD_METRICS_DIR": "/tmp/m"})
    assert read_settings(to_environ(settings)) == settings


def test_every_setting_has_a_description_and_an_md_variable():
    for info in describe():
        assert info.env == "MD_" + info.name.upper()
        assert info.description, info.name


def test_flag_types_come_from_the_field_types():
    """pydantic 1 turns constrained fields into subclasses; --help must still say INT, FLOAT, ..."""
    types = {info.name: info.type_name for info in describe()}
    assert (types["port"], types["install_backoff"], types["access_log"], types["model_dir"], types["log_level"]) == (
        "int", "float", "bool", "path", "choice"
    )
