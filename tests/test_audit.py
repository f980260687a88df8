"""The SBOM and the offline vulnerability report: `md-runtime sbom` and `md-runtime audit --osv DIR`."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import yaml
from packaging.version import Version

from md_runtime.audit import audit, dpkg_compare, failing, load_advisories, pep440_key, report_rows
from md_runtime.sbom import Package, make_sbom, packages_from_sbom
from osv_support import advisory, fixed, plant
from support import REPO, md_runtime


def pypi(name: str, version: str) -> Package:
    return Package("PyPI", name, version, "pkg:pypi/{}@{}".format(name.lower(), version), name, version)


def deb(name: str, version: str, source: str = "", source_version: str = "") -> Package:
    purl = "pkg:deb/debian/{}@{}?arch=amd64&distro=debian-11".format(name, version)
    return Package("Debian:11", name, version, purl, source or name, source_version or version)


VERSIONS = ["1.0.dev0", "1.0a1", "1.0a2.dev1", "1.0b1", "1.0rc1", "1.0", "1.0.0", "1.0.post0", "1.0.post1.dev2",
            "1.0.post1", "1.0.1", "1.9", "1.10", "2!0.1", "20.1.0", "0.46.1", "1.0-1", "v1.1", "1.1.0rc1", "3.1.6"]


def test_python_versions_order_as_pep_440_says():
    shuffled = VERSIONS[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=pep440_key) == sorted(shuffled, key=Version)


@pytest.mark.skipif(not shutil.which("dpkg"), reason="dpkg is the reference")
def test_debian_versions_order_as_dpkg_does():
    versions = ["1.0~rc1", "1.0", "1.0+b1", "1.0a", "1:0.9", "2.31-13+deb11u5", "2.31-13+deb11u11", "2.31-13",
                "1.1.1n-0+deb11u5", "1.1.1w-0+deb11u1", "1.0-1~bpo11+1", "1.0-1", "7.74.0-1.3+deb11u7", "7.74.0-1.3"]
    for left in versions:
        for right in versions:
            expected = next(
                code for code, op in ((-1, "lt"), (0, "eq"), (1, "gt"))
                if subprocess.run(["dpkg", "--compare-versions", left, op, right]).returncode == 0
            )
            assert dpkg_compare(left, right) == expected, (left, right)


@pytest.fixture
def planted(tmp_path):
    return plant(
        tmp_path / "osv",
        advisory("TEST-1", "gunicorn", fixed("22.0.0"), severity="high", cve="CVE-2024-1135"),
        advisory("TEST-2", "Flask", fixed("2.2.5"), fixed("2.3.2", introduced="2.3.0"), severity="high"),
        advisory("TEST-3", "scikit-learn", fixed("1.5.0"), severity="moderate"),  # installed as scikit_learn
        advisory("TEST-4", "numpy", [{"introduced": "1.20"}, {"last_affected": "1.23.4"}], severity="low"),
        advisory("TEST-5", "pandas", [{"introduced": "1.5.2"}, {"fixed": "1.5.4"}]),  # starts after 1.5.1
        advisory("TEST-6", "pydantic", fixed("1.10.7"), severity="critical"),  # fixed in exactly what is installed
        advisory("TEST-7", "nltk", versions=["3.6", "3.7"]),  # a list, no ranges
        advisory("TEST-8", "torch", fixed("2.6.0")),  # not installed
        advisory("TEST-9", "openssl", fixed("1.1.1w-0+deb11u1"), ecosystem="Debian:11", severity="high"),
        advisory("TEST-10", "openssl", fixed("3.0.0"), ecosystem="Debian:12"),  # another release of Debian
    )


INSTALLED = [pypi("gunicorn", "20.1.0"), pypi("Flask", "2.2.2"), pypi("scikit_learn", "1.1.1"), pypi("numpy", "1.23.4"),
             pypi("pandas", "1.5.1"), pypi("pydantic", "1.10.7"), pypi("nltk", "3.7"),
             deb("libssl1.1", "1.1.1n-0+deb11u5", source="openssl")]


def test_the_report_finds_exactly_the_advisories_that_cover_what_is_installed(planted):
    findings = audit(INSTALLED, load_advisories(planted))
    assert sorted((f.package.name, f.advisory.id) for f in findings) == [
        ("Flask", "TEST-2"), ("gunicorn", "TEST-1"), ("libssl1.1", "TEST-9"), ("nltk", "TEST-7"), ("numpy", "TEST-4"),
        ("scikit_learn", "TEST-3"),
    ]
    rows = {row["package"]: row for row in report_rows(findings)}
    assert rows["Flask"]["fixed_in"] == "2.2.5", "the way out inside the installed line"
    assert rows["gunicorn"]["fixed_in"] == "22.0.0" and rows["gunicorn"]["aliases"] == ["CVE-2024-1135"]
    assert rows["gunicorn"]["serving_stack"] and not rows["scikit_learn"]["serving_stack"]
    assert rows["libssl1.1"]["fixed_in"] == "1.1.1w-0+deb11u1" and rows["libssl1.1"]["severity"] == "high"
    assert rows["numpy"]["fixed_in"] == "> 1.23.4" and rows["numpy"]["unfixed"] == []
    assert rows["nltk"]["fixed_in"] is None and rows["nltk"]["unfixed"] == ["TEST-7"]


def test_fail_on_counts_severity_and_scope(planted):
    findings = audit(INSTALLED, load_advisories(planted))
    ids = lambda chosen: sorted(f.advisory.id for f in chosen)  # noqa: E731
    assert ids(failing(findings, "never", "all")) == []
    assert ids(failing(findings, "high", "all")) == ["TEST-1", "TEST-2", "TEST-7", "TEST-9"], "unrated ones count"
    assert ids(failing(findings, "moderate", "all")) == ["TEST-1", "TEST-2", "TEST-3", "TEST-7", "TEST-9"]
    assert ids(failing(findings, "any", "serving")) == ["TEST-1", "TEST-2"]


def test_a_withdrawn_advisory_a_git_range_and_yaml_records_are_read_as_osv_says(tmp_path):
    osv = tmp_path / "osv"
    withdrawn = advisory("TEST-W", "gunicorn", fixed("22.0.0"))
    withdrawn["withdrawn"] = "2026-01-01T00:00:00Z"
    git_only = advisory("TEST-G", "gunicorn")
    git_only["affected"][0]["ranges"] = [{"type": "GIT", "repo": "https://example.invalid/g",
                                          "events": [{"introduced": "0"}, {"fixed": "abc123"}]}]
    plant(osv, withdrawn, git_only)
    (osv / "PyPI" / "TEST-Y.yaml").write_text(yaml.safe_dump(advisory("TEST-Y", "GUNICORN", fixed("21.2.0"))))
    findings = audit([pypi("gunicorn", "20.1.0")], load_advisories(osv))
    assert [f.advisory.id for f in findings] == ["TEST-Y"]


def test_audit_cli_reports_and_a_new_advisory_fails_the_threshold(tmp_path, planted):
    sbom = tmp_path / "sbom.json"
    sbom.write_text(json.dumps(make_sbom(INSTALLED, "md-base/python/python-39:1.1.0")))
    assert packages_from_sbom(json.loads(sbom.read_text())) == INSTALLED

    passing = md_runtime("audit", "--osv", str(planted), "--sbom", str(sbom), "--fail-on", "critical", "--scope", "serving")
    assert passing.returncode == 0, passing.stderr
    assert passing.stdout.startswith("6 of 8 packages are covered by advisories (10 read)")
    assert "| gunicorn (serving) | 20.1.0 | TEST-1 | CVE-2024-1135 | high | 22.0.0 |" in passing.stdout

    plant(planted, advisory("TEST-NEW", "werkzeug", fixed("9"), severity="critical"),
          advisory("TEST-NEWER", "Flask", fixed("3.1.3"), severity="critical"))
    failed = md_runtime("audit", "--osv", str(planted), "--sbom", str(sbom), "--fail-on", "critical", "--scope", "serving")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        "md-runtime: error: 1 advisory at --fail-on critical (scope serving) cover Flask 2.2.2: move them to the "
        "versions the table gives as outside them")
    report = json.loads(md_runtime("audit", "--osv", str(planted), "--sbom", str(sbom), "--format", "json").stdout)
    assert {row["package"]: row["fixed_in"] for row in report["affected"]}["Flask"] == "3.1.3"

    missing = md_runtime("audit", "--osv", str(tmp_path / "nowhere"), "--sbom", str(sbom))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no OSV directory at" in missing.stderr


def test_the_sbom_made_here_lists_every_package_pip_reports_with_its_version(tmp_path):
    listed = subprocess.run([sys.executable, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                            check=True)
    pip_says = {(p["name"].lower().replace("_", "-"), p["version"]) for p in json.loads(listed.stdout)}
    done = md_runtime("sbom", "--image", "test/here:1", "--output", str(tmp_path / "sbom.json"))  # made now, here
    assert done.returncode == 0, done.stderr
    sbom = json.loads((tmp_path / "sbom.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    pypi_components = {(c["name"].lower().replace("_", "-"), c["version"]) for c in sbom["components"]
                       if c["purl"].startswith("pkg:pypi/")}
    assert pypi_components == pip_says


def test_the_patched_line_leaves_the_serving_stack_outside_every_recorded_advisory():
    """dockerfiles/advisories, the ranges recorded in March 2026, against each image's pins per line."""
    sys.path.insert(0, str(REPO / "dockerfiles"))
    try:
        import images
    finally:
        sys.path.pop(0)
    advisories = load_advisories(REPO / "dockerfiles" / "advisories")
    for image in images.read_images().values():
        exact = audit([pypi(n, v) for n, v in image.pins("exact").items()], advisories)
        patched = audit([pypi(n, v) for n, v in image.pins("patched").items()], advisories)
        assert {"gunicorn", "werkzeug", "flask", "gevent", "pydantic", "setuptools"} <= {f.package.name for f in exact}
        still = sorted({f.package.name for f in failing(patched, "any", "serving")})
        assert still == (["flask", "gevent", "setuptools", "werkzeug", "wheel"] if image.python == "3.8" else []), \
            (image.name, still)
