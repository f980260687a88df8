"""cli: `md-runtime check` and `config`, run as a user runs them, with their one-line reasons and exit codes."""

import pandas as pd
import pytest

from md_runtime.checks import generated_rows
from md_runtime.cli import settings_table
from md_runtime.spec import ModelSpec
from md_runtime.settings import describe
from support import FIXTURE_MODELS, REPO, md_runtime, runtime_env


def test_check_good_model_with_sample(iris_model_dir, tmp_path):
    sample = tmp_path / "rows.json"
    sample.write_text('[{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]')
    result = md_runtime("check", str(iris_model_dir), "--sample", str(sample))
    assert result.returncode == 0, result.stderr
    assert "predict: 1 rows in ({}) -> 1 rows out".format(sample) in result.stdout
    assert "output columns: proba_setosa, proba_versicolor, proba_virginica" in result.stdout
    assert "peak memory:" in result.stdout and result.stdout.strip().endswith("keeps the package.py contract")


def test_check_uses_the_model_directory_sample_csv(iris_model_dir):
    result = md_runtime("check", str(iris_model_dir))
    assert result.returncode == 0, result.stderr
    assert "predict: 5 rows in ({}) -> 5 rows out".format(iris_model_dir / "sample.csv") in result.stdout


def test_check_without_sample_generates_rows_from_declared_inputs(fixture_models):
    result = md_runtime("check", str(fixture_models / "declares_columns"))
    assert result.returncode == 0, result.stderr
    assert "predict: 3 rows in (generated from model.yaml's inputs (no data-type for a, b: floats)) -> 3 rows out" in result.stdout


def test_check_fails_a_model_that_breaks_only_on_real_rows(fixture_models):
    result = md_runtime("check", str(fixture_models / "breaks_on_rows"))
    assert result.returncode == 3, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("md-runtime: error: predict() raised KeyError") and "ok:" not in result.stdout


def test_check_without_rows_says_how_to_give_them(fixture_models):
    result = md_runtime("check", str(fixture_models / "sums_columns"))
    assert result.returncode == 3 and "ok:" not in result.stdout
    assert "no rows to predict on, so nothing was checked: pass --sample FILE" in result.stderr


def test_generated_rows_follow_types_ranges_and_possible_values():
    spec = ModelSpec(["n", "k", "flag", "city", "when"], columns={
        "n": {"data-type": "float", "value-range-min": 1.0, "value-range-max": 3.0},
        "k": {"data-type": "int", "value-range-min": 20, "value-range-max": 60},
        "flag": {"data-type": "bool"},
        "city": {"data-type": "category", "possible-values": ["a", "b"]},
        "when": {"data-type": "timestamp"},
    })
    rows = generated_rows(spec)
    assert rows["n"].tolist() == [1.0, 2.0, 3.0] and rows["k"].tolist() == [20, 40, 60]
    assert rows["flag"].tolist() == [True, False, True] and rows["city"].tolist() == ["a", "b", "a"]
    assert pd.to_datetime(rows["when"]).notna().all()


@pytest.mark.parametrize(
    "name,code,reason",
    [
        ("no_get_model", 4, "package.py: no get_model() function"),
        ("no_package_py", 4, "no package.py found"),
        ("returns_list", 3, "predict() returned list instead of a pandas DataFrame"),
        ("returns_wrong_rows", 3, "predict() returned 1 rows for 2 input rows"),
        ("mutates_input", 3, "predict() modified its input DataFrame in place"),
    ],
)
def test_check_broken_model_gives_one_line_reason(tmp_path, name, code, reason):
    sample = tmp_path / "rows.csv"
    sample.write_text("x\n1\n2\n")
    result = md_runtime("check", str(FIXTURE_MODELS / name), "--sample", str(sample))
    assert result.returncode == code
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("md-runtime: error: ") and reason in last


def test_check_unreadable_sample(fixture_models, tmp_path):
    result = md_runtime("check", str(fixture_models / "sums_columns"), "--sample", str(tmp_path / "absent.csv"))
    assert result.returncode == 3 and "cannot read sample" in result.stderr


def test_config_prints_effective_settings():
    result = md_runtime("config", env=runtime_env(MD_PORT="9001"))
    assert result.returncode == 0
    assert "MD_PORT=9001" in result.stdout.splitlines()
    assert len(result.stdout.splitlines()) == len(describe())


def test_readme_settings_table_is_generated_from_settings():
    assert settings_table() in (REPO / "README.md").read_text(), "run `md-runtime config --markdown` into README.md"


def test_serve_help_lists_a_flag_per_setting():
    result = md_runtime("serve", "--help")
    for info in describe():
        if info.name != "model_dir":
            assert "--" + info.name.replace("_", "-") in result.stdout


def test_a_flag_the_command_does_not_know_gets_that_commands_usage():
    result = md_runtime("serve", "--bogus")
    assert result.returncode == 2
    assert "usage: md-runtime serve" in result.stderr and "md-runtime serve: error: unrecognized arguments: --bogus" in result.stderr


def test_on_off_settings_are_switches():
    from md_runtime.cli import parse
    from md_runtime.settings import read_settings

    args = parse(["serve", "some_dir", "--access-log", "--no-memory-check", "--offline"])
    settings = read_settings({}, access_log=args.access_log, memory_check=args.memory_check, offline=args.offline)
    assert (settings.access_log, settings.memory_check, settings.offline) == (True, False, True)
    assert parse(["serve"]).access_log is None, "an absent switch leaves the environment's value"


def test_a_missing_model_directory_that_was_passed_says_to_check_the_path(tmp_path):
    result = md_runtime("serve", str(tmp_path / "absent"))
    assert result.returncode == 4
    assert result.stderr.strip().endswith("no such directory; check the path")


def test_check_refuses_a_sample_without_rows(fixture_models, tmp_path):
    sample = tmp_path / "rows.csv"
    sample.write_text("a,b\n")
    result = md_runtime("check", str(fixture_models / "sums_columns"), "--sample", str(sample))
    assert result.returncode == 3 and "sample {}: could not read the request body as CSV: it holds no rows".format(sample) in result.stderr
