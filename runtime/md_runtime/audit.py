"""Which installed packages public advisories cover: an SBOM's packages matched against a directory of OSV
records (https://ossf.github.io/osv-schema/), offline. PyPI versions compare as PEP 440 says, Debian's as dpkg
does. A package is affected when its version falls in a range between an `introduced` event and the next `fixed`
(exclusive) or `last_affected` (inclusive), or, for a record without release ranges, when its version is listed."""

import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .errors import AuditInputError
from .sbom import Package, normalize

SEVERITIES = ("low", "moderate", "high", "critical")
FAIL_ON = ("never", "any") + SEVERITIES
# What serves requests and installs overrides, as opposed to the libraries a package.py imports: the patched
# release line moves all of these to fixed versions (`audit --scope serving`).
SERVING_STACK = frozenset(normalize(name) for name in (
    "md-runtime", "gunicorn", "werkzeug", "flask", "jinja2", "markupsafe", "itsdangerous", "click", "blinker",
    "gevent", "greenlet", "zope.event", "zope.interface", "pydantic", "typing-extensions", "orjson", "pyyaml",
    "prometheus-flask-exporter", "prometheus-client", "packaging", "pip", "setuptools", "wheel",
))


class Advisory(NamedTuple):
    id: str
    aliases: Tuple[str, ...]
    summary: str
    severity: Optional[str]  # low, moderate, high, critical; None when the record does not say
    affected: Tuple[Dict[str, Any], ...]


class Finding(NamedTuple):
    package: Package
    advisory: Advisory
    fixed: Tuple[str, ...]  # the versions its ranges name as fixed: the ways out
    last_affected: Tuple[str, ...]  # or the last versions affected, when a range names no fix


# ---- versions ----------------------------------------------------------------------------------------------

_PEP440 = re.compile(
    r"^v?(?:(?P<epoch>\d+)!)?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre_l>a|b|c|rc|alpha|beta|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:-(?P<post_n1>\d+)|[-_.]?(?:post|rev|r)[-_.]?(?P<post_n2>\d*))?"
    r"(?:[-_.]?dev[-_.]?(?P<dev_n>\d*))?(?:\+[a-z0-9.]+)?$", re.IGNORECASE)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def pep440_key(version: str) -> Tuple[Any, ...]:
    """A sort key ordering versions as PEP 440 does (1.0.dev0 < 1.0a1 < 1.0 < 1.0.post1); unparseable ones
    sort first, by their digits."""
    match = _PEP440.match(version.strip())
    if not match:
        return (-1, tuple(int(n) for n in re.findall(r"\d+", version)))
    release = tuple(int(n) for n in match["release"].split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    post = match["post_n1"] if match["post_n1"] is not None else match["post_n2"]  # "" for a bare ".post"
    dev = match["dev_n"]
    if match["pre_l"]:
        pre = (0, _PRE_RANK[match["pre_l"].lower()], int(match["pre_n"] or 0))  # type: Tuple[int, ...]
    elif dev is not None and post is None:
        pre = (-1,)  # 1.0.dev0 comes before 1.0a1
    else:
        pre = (1,)
    post_key = (0, int(post or 0)) if post is not None else (-1,)
    dev_key = (0, int(dev or 0)) if dev is not None else (1,)
    return (0, int(match["epoch"] or 0), release, pre, post_key, dev_key)


def _dpkg_order(char: str) -> int:
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _dpkg_compare_part(left: str, right: str) -> int:
    """dpkg's verrevcmp: alternate non-digit runs (letters before other signs, ~ before the end) and numbers."""
    while left or right:
        left_text, right_text = re.match(r"\D*", left).group(), re.match(r"\D*", right).group()  # type: ignore
        for i in range(max(len(left_text), len(right_text))):
            a = _dpkg_order(left_text[i]) if i < len(left_text) else 0
            b = _dpkg_order(right_text[i]) if i < len(right_text) else 0
            if a != b:
                return -1 if a < b else 1
        left, right = left[len(left_text):], right[len(right_text):]
        left_number, right_number = re.match(r"\d*", left).group(), re.match(r"\d*", right).group()  # type: ignore
        if int(left_number or 0) != int(right_number or 0):
            return -1 if int(left_number or 0) < int(right_number or 0) else 1
        left, right = left[len(left_number):], right[len(right_number):]
    return 0


def _dpkg_split(version: str) -> Tuple[int, str, str]:
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
    return int(epoch or 0), upstream, revision


def dpkg_compare(left: str, right: str) -> int:
    """-1, 0 or 1 as dpkg --compare-versions orders two Debian versions (epoch:upstream-revision)."""
    (left_epoch, left_upstream, left_rev), (right_epoch, right_upstream, right_rev) = _dpkg_split(left), _dpkg_split(right)
    if left_epoch != right_epoch:
        return -1 if left_epoch < right_epoch else 1
    return _dpkg_compare_part(left_upstream, right_upstream) or _dpkg_compare_part(left_rev, right_rev)


def _compare_for(ecosystem: str) -> Callable[[str, str], int]:
    if ecosystem.startswith("Debian"):
        return dpkg_compare

    def compare(left: str, right: str) -> int:
        a, b = pep440_key(left), pep440_key(right)
        return (a > b) - (a < b)

    return compare


# ---- advisories --------------------------------------------------------------------------------------------

def _severity(record: Dict[str, Any]) -> Optional[str]:
    """GitHub's and OSV's records say it in database_specific (or an affected entry's ecosystem_specific)."""
    places = [record.get("database_specific") or {}] + [a.get("ecosystem_specific") or {} for a in record.get("affected", [])]
    for place in places:
        value = str(place.get("severity", "")).lower()
        if value == "medium":
            value = "moderate"
        if value in SEVERITIES:
            return value
    return None


def _records(path: Path) -> List[Dict[str, Any]]:
    text = path.read_text()
    if path.suffix == ".json":
        loaded = json.loads(text)
    else:
        try:
            import yaml
        except ImportError:
            raise AuditInputError("{} is YAML: install PyYAML to read it, or convert the directory to JSON".format(path))
        try:
            loaded = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as exc:
            raise ValueError(str(exc))
    return [r for r in (loaded if isinstance(loaded, list) else [loaded]) if isinstance(r, dict) and r.get("id")]


def load_advisories(directory: Path) -> List[Advisory]:
    """Every OSV record under directory (*.json, *.yaml, *.yml; a file may hold one record or a list)."""
    if not directory.is_dir():
        raise AuditInputError("no OSV directory at {}: give a directory of OSV records (.json or .yaml)".format(directory))
    advisories = []
    for path in sorted(directory.rglob("*")):
        if path.suffix not in (".json", ".yaml", ".yml") or not path.is_file():
            continue
        try:
            records = _records(path)
        except ValueError as exc:
            raise AuditInputError("{} is not an OSV record: {}".format(path, exc))
        for record in records:
            if record.get("withdrawn"):
                continue
            advisories.append(Advisory(str(record["id"]), tuple(record.get("aliases") or ()),
                                       str(record.get("summary") or record.get("details", ""))[:200].split("\n")[0],
                                       _severity(record), tuple(record.get("affected") or ())))
    return advisories


def _same_package(affected: Dict[str, Any], package: Package) -> bool:
    named = affected.get("package") or {}
    ecosystem = str(named.get("ecosystem", ""))
    if package.ecosystem == "PyPI":
        return ecosystem == "PyPI" and normalize(str(named.get("name", ""))) == normalize(package.source)
    # "Debian" covers every release, "Debian:11" only bullseye
    same_release = ecosystem == "Debian" or ecosystem == package.ecosystem
    return ecosystem.startswith("Debian") and same_release and named.get("name") == package.source


def _in_range(version: str, events: Sequence[Dict[str, str]], compare: Callable[[str, str], int]) -> bool:
    def by_version(left: Dict[str, str], right: Dict[str, str]) -> int:
        a, b = next(iter(left.values())), next(iter(right.values()))
        return -1 if a == "0" else 1 if b == "0" else compare(a, b)  # "0": before every version

    ordered = sorted(events, key=functools.cmp_to_key(by_version))
    affected = False
    for event in ordered:
        kind, value = next(iter(event.items()))
        if kind == "introduced" and (value == "0" or compare(version, value) >= 0):
            affected = True
        elif kind == "fixed" and compare(version, value) >= 0:
            affected = False
        elif kind == "last_affected" and compare(version, value) > 0:
            affected = False
    return affected


def match(package: Package, advisory: Advisory) -> Optional[Finding]:
    compare = _compare_for(package.ecosystem)
    version = package.source_version
    hit, fixed, last = False, [], []  # type: bool, List[str], List[str]
    for affected in advisory.affected:
        if not _same_package(affected, package):
            continue
        # GIT ranges name commits, not releases
        ranges = [r for r in affected.get("ranges") or () if r.get("type") in ("ECOSYSTEM", "SEMVER")]
        for kind_range in ranges:
            events = [e for e in kind_range.get("events") or () if e and next(iter(e)) in ("introduced", "fixed", "last_affected")]
            if _in_range(version, events, compare):
                hit = True
                fixed += [e["fixed"] for e in events if "fixed" in e and compare(e["fixed"], version) > 0]
                last += [e["last_affected"] for e in events if "last_affected" in e]
        if not ranges:  # with ranges, the list is derived from them, and PyPA's is known to hold the fixed release
            hit = hit or any(compare(version, v) == 0 for v in affected.get("versions") or ())
    if not hit:
        return None
    in_order = functools.cmp_to_key(compare)
    return Finding(package, advisory, tuple(sorted(set(fixed), key=in_order)), tuple(sorted(set(last), key=in_order)))


def _named(affected: Dict[str, Any]) -> str:
    return normalize(str((affected.get("package") or {}).get("name", "")))


def audit(packages: Iterable[Package], advisories: Sequence[Advisory]) -> List[Finding]:
    by_name = {}  # type: Dict[str, List[Advisory]]
    for advisory in advisories:
        for name in {_named(affected) for affected in advisory.affected}:
            by_name.setdefault(name, []).append(advisory)
    findings = []
    for package in packages:
        candidates = by_name.get(normalize(package.source), [])
        findings += [f for f in (match(package, a) for a in candidates) if f is not None]
    return findings


# ---- the verdict and the report ----------------------------------------------------------------------------

def failing(findings: Sequence[Finding], fail_on: str, scope: str) -> List[Finding]:
    """The findings that fail the audit: at or above fail_on's severity (an unknown severity counts as any, so an
    unrated advisory is never waved through), among the serving stack's packages when scope is serving."""
    if fail_on == "never":
        return []
    floor = -1 if fail_on == "any" else SEVERITIES.index(fail_on)
    chosen = []
    for finding in findings:
        if scope == "serving" and normalize(finding.package.name) not in SERVING_STACK:
            continue
        severity = finding.advisory.severity
        if severity is None or SEVERITIES.index(severity) >= floor:
            chosen.append(finding)
    return chosen


def lowest_outside(found: Sequence[Finding]) -> Optional[str]:
    """The lowest fixed version that none of one package's advisories covers: Flask 2.2.2's way out of an
    advisory fixed in 2.2.5 and 2.3.2 is 2.2.5, unless another advisory covers 2.2.5 too. When no fixed version
    is outside them all but a range ends at a last affected version L: "> L"."""
    in_order = functools.cmp_to_key(_compare_for(found[0].package.ecosystem))
    for candidate in sorted({v for f in found for v in f.fixed}, key=in_order):
        moved = found[0].package._replace(version=candidate, source_version=candidate)
        if all(match(moved, f.advisory) is None for f in found):
            return candidate
    last = [v for f in found for v in f.last_affected]
    return "> " + max(last, key=in_order) if last else None


def report_rows(findings: Sequence[Finding]) -> List[Dict[str, Any]]:
    """A row per affected package: its advisories, and the lowest version outside all of them."""
    by_package = {}  # type: Dict[Tuple[str, str], List[Finding]]
    for finding in findings:
        by_package.setdefault((finding.package.ecosystem, finding.package.name), []).append(finding)
    rows = []
    for (ecosystem, name), found in sorted(by_package.items(), key=lambda item: normalize(item[0][1])):
        rows.append({
            "package": name, "ecosystem": ecosystem, "version": found[0].package.version,
            "serving_stack": normalize(name) in SERVING_STACK,
            "advisories": sorted({f.advisory.id for f in found}),
            "aliases": sorted({a for f in found for a in f.advisory.aliases if a.startswith("CVE-")}),
            "severity": max((f.advisory.severity for f in found if f.advisory.severity), key=SEVERITIES.index, default=None),
            "fixed_in": lowest_outside(found),
            "unfixed": sorted({f.advisory.id for f in found if not f.fixed and not f.last_affected}),
        })
    return rows


def render(rows: Sequence[Dict[str, Any]], checked: int, advisories: int, form: str) -> str:
    if form == "json":
        return json.dumps({"packages_checked": checked, "advisories_read": advisories, "affected": list(rows)}, indent=2)
    lines = ["| package | installed | advisories | CVEs | severity | lowest version outside them |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        outside = row["fixed_in"] or "none released"
        if row["fixed_in"] and row["unfixed"]:
            outside += " (and no fix for {})".format(", ".join(row["unfixed"]))
        lines.append("| {}{} | {} | {} | {} | {} | {} |".format(
            row["package"], " (serving)" if row["serving_stack"] else "", row["version"], ", ".join(row["advisories"]),
            ", ".join(row["aliases"]) or "-", row["severity"] or "-", outside))
    summary = "{} of {} packages are covered by advisories ({} read)".format(len(rows), checked, advisories)
    return "\n".join(([summary, ""] + lines) if rows else [summary])
