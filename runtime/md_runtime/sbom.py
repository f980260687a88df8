"""What an image holds: a CycloneDX 1.5 SBOM of the Python distributions installed beside the runtime (what pip
reports) and the Debian packages dpkg records. The image build writes it to IMAGE_SBOM; `md-runtime sbom` shows it.
"""

import datetime
import json
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional
from urllib.parse import quote

from . import __version__
from .errors import AuditInputError

IMAGE_SBOM = Path("/usr/share/md-base/sbom.json")
DPKG_STATUS = Path("/var/lib/dpkg/status")
OS_RELEASE = Path("/etc/os-release")


class Package(NamedTuple):
    """One installed package. ecosystem is OSV's name for its registry: PyPI or Debian:N. source and
    source_version are what advisories name: the Debian source package and its version, the package itself on PyPI."""

    ecosystem: str
    name: str
    version: str
    purl: str
    source: str
    source_version: str


def normalize(name: str) -> str:
    """PEP 503: Scikit_Learn, scikit.learn and scikit-learn are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def python_packages() -> List[Package]:
    from importlib import metadata

    found = {}  # type: Dict[str, Package]
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or normalize(name) in found:  # the first on sys.path is the one imported, as pip list shows
            continue
        purl = "pkg:pypi/{}@{}".format(normalize(name), quote(dist.version))
        found[normalize(name)] = Package("PyPI", name, dist.version, purl, name, dist.version)
    return sorted(found.values(), key=lambda p: normalize(p.name))


def debian_release(os_release: Path = OS_RELEASE) -> Optional[str]:
    """VERSION_ID of a Debian system ("11"), None elsewhere."""
    try:
        fields = dict(line.split("=", 1) for line in os_release.read_text().splitlines() if "=" in line)
    except OSError:
        return None
    if fields.get("ID", "").strip('"') != "debian":
        return None
    return fields.get("VERSION_ID", "").strip('"') or None


def _paragraphs(text: str) -> Iterator[Dict[str, str]]:
    for block in text.split("\n\n"):
        fields = {}  # type: Dict[str, str]
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def debian_packages(status: Path = DPKG_STATUS, os_release: Path = OS_RELEASE) -> List[Package]:
    """The installed packages in dpkg's status file; none off Debian."""
    release = debian_release(os_release)
    if release is None or not status.is_file():
        return []
    packages = []
    for fields in _paragraphs(status.read_text(errors="replace")):
        if not fields.get("Status", "").endswith(" installed") or "Version" not in fields:
            continue
        name, version, arch = fields["Package"], fields["Version"], fields.get("Architecture", "all")
        source, _, source_version = fields.get("Source", name).partition(" ")
        source_version = source_version.strip("()") or version
        purl = "pkg:deb/debian/{}@{}?arch={}&distro=debian-{}".format(name, quote(version, safe=""), arch, release)
        if source != name:
            purl += "&upstream={}".format(quote(source))
        packages.append(Package("Debian:" + release, name, version, purl, source, source_version))
    return sorted(packages, key=lambda p: p.name)


def installed() -> List[Package]:
    return python_packages() + debian_packages()


def make_sbom(packages: List[Package], image: Optional[str] = None) -> Dict[str, Any]:
    """CycloneDX 1.5 JSON. image: NAME:VERSION of the image the SBOM describes."""
    metadata = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tools": {"components": [{"type": "application", "name": "md-runtime", "version": __version__}]},
    }  # type: Dict[str, Any]
    if image:
        name, _, version = image.rpartition(":")
        metadata["component"] = {"type": "container", "name": name or image, "version": version if name else ""}
    components = []
    for package in packages:
        component = {"type": "library", "bom-ref": package.purl, "name": package.name,
                     "version": package.version, "purl": package.purl}  # type: Dict[str, Any]
        if (package.source, package.source_version) != (package.name, package.version):
            component["properties"] = [{"name": "md-base:source", "value": package.source},
                                       {"name": "md-base:source-version", "value": package.source_version}]
        components.append(component)
    return {"bomFormat": "CycloneDX", "specVersion": "1.5", "serialNumber": "urn:uuid:{}".format(uuid.uuid4()),
            "version": 1, "metadata": metadata, "components": components}


def packages_from_sbom(sbom: Dict[str, Any]) -> List[Package]:
    """The packages of a CycloneDX SBOM written by make_sbom (or any with pkg:pypi and pkg:deb purls)."""
    packages = []
    for component in sbom.get("components", []):
        purl = component.get("purl", "")
        if purl.startswith("pkg:pypi/"):
            name, version = component["name"], component["version"]
            packages.append(Package("PyPI", name, version, purl, name, version))
        elif purl.startswith("pkg:deb/"):
            release = re.search(r"distro=debian-([0-9.]+)", purl)
            properties = {p["name"]: p["value"] for p in component.get("properties", [])}
            name, version = component["name"], component["version"]
            ecosystem = "Debian:" + release.group(1) if release else "Debian"
            packages.append(Package(ecosystem, name, version, purl, properties.get("md-base:source", name),
                                    properties.get("md-base:source-version", version)))
    return packages


def read_sbom(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AuditInputError("cannot read the SBOM {}: {}".format(path, exc))


def this_sbom() -> Dict[str, Any]:
    """The image's SBOM when this is an md-base image, else one made now from this environment."""
    return read_sbom(IMAGE_SBOM) if IMAGE_SBOM.is_file() else make_sbom(installed())


def write_sbom(sbom: Dict[str, Any], output: Optional[str]) -> None:
    text = json.dumps(sbom, indent=2) + "\n"
    if output in (None, "-"):
        sys.stdout.write(text)
        return
    target = Path(str(output))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
