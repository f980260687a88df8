"""The md-base images: build them (behind build.sh), and inside each image's build list and verify its pins.

Standard library only, Python 3.8+: it runs on the host that builds the images, where md-runtime may not be
installed, and inside each image with its own Python.
"""

import argparse
import configparser
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPOSITORY = "md-base/python"
ENGINES = ("docker", "podman")
LINES = ("exact", "patched")
TOOLS = ("pip", "setuptools", "wheel")  # installed before the rest: the runtime's wheel is built with them
PIP_AUDIT = "pip-audit"  # --audit pip-audit: PyPI's advisories, online


class Image(NamedTuple):
    name: str
    version: str  # the exact line: the documented tag and libraries
    patched: str  # the patched line's tag
    patched_pins: str  # laid over the exact pins for the patched line
    python: str
    base: str
    apt: str

    def version_of(self, line: str) -> str:
        return self.patched if line == "patched" else self.version

    def tag(self, registry: Optional[str], line: str = "exact") -> str:
        tag = "{}/{}:{}".format(REPOSITORY, self.name, self.version_of(line))
        return "{}/{}".format(registry.rstrip("/"), tag) if registry else tag

    def pins(self, line: str) -> Dict[str, str]:
        pins = read_pins(HERE / "pins" / "{}.txt".format(self.name))
        if line == "patched":
            for name, version in read_pins(HERE / "pins" / self.patched_pins).items():
                if version == REMOVED:
                    pins.pop(name, None)
                else:
                    pins[name] = version
        return pins


class BuildError(Exception):
    pass


def read_images(path: Path = HERE / "images.ini") -> Dict[str, Image]:
    parser = configparser.ConfigParser()
    parser.read(str(path))
    return {
        name: Image(name, section["version"], section["patched"], section.get("patched_pins", "patched.txt"),
                    section["python"], section["base"], section.get("apt", "").strip())
        for name, section in parser.items()
        if name != configparser.DEFAULTSECT
    }


def normalize(name: str) -> str:
    """PEP 503: scikit_learn, Scikit.Learn and scikit-learn are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


REMOVED = "removed"


def read_pins(path: Path) -> Dict[str, str]:
    """name -> version for every `name==version` line of a pins file and the files it includes with -r (a later
    line wins); in a patched line's overlay, `!name` removes name: name -> REMOVED."""
    pins = {}  # type: Dict[str, str]
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins.update(read_pins(path.parent / line[3:].strip()))
        elif line.startswith("!"):
            pins[normalize(line[1:])] = REMOVED
        elif line:
            name, _, version = line.partition("==")
            if not version:
                raise BuildError("{}: {!r} is not pinned with ==".format(path, line))
            pins[normalize(name)] = version.strip()
    return pins


def pin_problems(pins: Dict[str, str], absent: Sequence[str] = ()) -> List[str]:
    from importlib import metadata

    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = []
    for name, version in sorted(pins.items()):
        if installed.get(name) != version:
            problems.append("{}=={} is pinned but {} is installed".format(name, version, installed.get(name, "nothing")))
    for name in absent:
        if name in installed:
            problems.append("{} is removed from this line but {} is installed".format(name, installed[name]))
    if "md-runtime" not in installed:
        problems.append("md-runtime is not installed")
    return problems


def chosen_image(name: str) -> Image:
    images = read_images()
    if name not in images:
        raise BuildError("unknown image {}: choose from {}".format(name, ", ".join(images)))
    return images[name]


def list_pins(args: argparse.Namespace) -> int:
    """The requirements of one image's line, as pip reads them: its tools, or everything."""
    for name, version in sorted(chosen_image(args.name).pins(args.line).items()):
        if not args.tools or name in TOOLS:
            print("{}=={}".format(name, version))
    return 0


def verify_pins(args: argparse.Namespace) -> int:
    pins = chosen_image(args.name).pins(args.line)
    removed = sorted(set(chosen_image(args.name).pins("exact")) - set(pins))
    problems = pin_problems(pins, absent=removed)
    for problem in problems:
        print("verify-pins: " + problem, file=sys.stderr)
    if problems:
        print("verify-pins: error: pip resolved versions other than the {} line's pins of {}".format(args.line, args.name),
              file=sys.stderr)
        return 1
    print("verify-pins: all {} pins of {}'s {} line hold".format(len(pins), args.name, args.line))
    return 0


def detect_engine() -> str:
    """docker when its engine answers (the client alone is not enough), else podman."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise BuildError(
        "no container engine found: install Docker (with a running engine) or Podman, or name one with --engine"
    )


def build_command(engine: str, image: Image, line: str, tag: str, base: str, extra: Sequence[str]) -> List[str]:
    pins = ",".join("{}=={}".format(n, v) for n, v in sorted(image.pins(line).items()))
    command = [engine, "build", "-f", str(HERE / "Dockerfile"), "-t", tag]
    if engine == "podman":
        command += ["--format", "docker"]  # the OCI format has no HEALTHCHECK
    for key, value in (
        ("BASE_IMAGE", base),
        ("IMAGE_NAME", image.name),
        ("IMAGE_VERSION", image.version_of(line)),
        ("RELEASE_LINE", line),
        ("PYTHON_VERSION", image.python),
        ("APT_PACKAGES", image.apt),
        ("PINS", pins),
    ):
        command += ["--build-arg", "{}={}".format(key, value)]
    return command + list(extra) + [str(HERE.parent)]


def image_size(engine: str, tag: str) -> int:
    done = subprocess.run([engine, "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True)
    return int(done.stdout.strip() or 0)


def run_in_image(engine: str, tag: str, flags: Sequence[str], *command: str) -> "subprocess.CompletedProcess[str]":
    """An md-runtime command in the image, as it runs in production: read-only, no capabilities, no network."""
    return subprocess.run([engine, "run", "--rm", "--read-only", "--cap-drop", "ALL", "--network", "none", *flags,
                           tag, *command], capture_output=True, text=True)


def audit_image(engine: str, tag: str, args: argparse.Namespace, reports: Optional[Path]) -> bool:
    """The image's vulnerability report, offline against an OSV directory or online with pip-audit: printed,
    kept in reports; False when it fails --fail-on."""
    if args.audit == PIP_AUDIT:
        done, source = pip_audit(engine, tag), "PyPI's advisories (pip-audit)"
    else:
        osv = Path(args.audit).resolve()
        done = run_in_image(engine, tag, ["-v", "{}:/osv:ro".format(osv)], "audit", "--osv", "/osv",
                            "--fail-on", args.fail_on, "--scope", args.scope)
        source = str(osv)
    print("---> audit of {} against {}\n{}{}".format(tag, source, done.stdout, done.stderr), flush=True)
    if reports is not None:
        (reports / (report_stem(tag) + ".audit.md")).write_text(done.stdout)
    if done.returncode not in (0, 1):
        raise BuildError("the audit of {} could not run (exit {}): {}".format(tag, done.returncode, done.stderr.strip()))
    return done.returncode == 0 or args.fail_on == "never"


def pip_audit(engine: str, tag: str) -> "subprocess.CompletedProcess[str]":
    """pip-audit on the Python packages of the image's SBOM. --strict: a package it cannot look up fails the
    audit instead of being skipped (as every one is where PyPI's JSON API is out of reach)."""
    if not shutil.which(PIP_AUDIT):
        raise BuildError("--audit pip-audit needs pip-audit on PATH (pip install pip-audit), or give --audit an OSV directory")
    done = run_in_image(engine, tag, [], "sbom")
    if done.returncode != 0:
        raise BuildError("{} has no readable SBOM: {}".format(tag, done.stderr.strip()))
    pins = ["{}=={}".format(c["name"], c["version"]) for c in json.loads(done.stdout)["components"]
            if c.get("purl", "").startswith("pkg:pypi/") and normalize(c["name"]) != "md-runtime"]  # not on PyPI
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as requirements:
        requirements.write("\n".join(pins) + "\n")
        requirements.flush()
        command = [PIP_AUDIT, "--strict", "--no-deps", "--disable-pip", "--requirement", requirements.name, "--format", "markdown"]
        return subprocess.run(command, capture_output=True, text=True)


def report_stem(tag: str) -> str:
    return tag.rsplit("/", 1)[-1].replace(":", "-")


def keep_sbom(engine: str, tag: str, reports: Path) -> None:
    done = run_in_image(engine, tag, [], "sbom")
    if done.returncode != 0:
        raise BuildError("{} has no readable SBOM: {}".format(tag, done.stderr.strip()))
    (reports / (report_stem(tag) + ".sbom.json")).write_text(done.stdout)


def build(args: argparse.Namespace) -> int:
    images = read_images()
    unknown = [name for name in args.names if name not in images]
    if unknown:
        raise BuildError("unknown image {}: choose from {}".format(", ".join(unknown), ", ".join(images)))
    engine = args.engine or detect_engine()
    lines = LINES if args.line == "both" else (args.line,)
    chosen = [(images[name], line) for name in (args.names or list(images)) for line in lines]
    reports = Path(args.reports) if args.reports else None
    if reports is not None:
        reports.mkdir(parents=True, exist_ok=True)
    built, failed_audits = [], []
    for image, line in chosen:
        tag = image.tag(args.registry, line)
        command = build_command(engine, image, line, tag, args.base_image or image.base, args.engine_flags)
        print("---> building {} ({} line) on {}".format(tag, line, args.base_image or image.base), flush=True)
        started = time.monotonic()
        if subprocess.run(command).returncode != 0:
            raise BuildError("{} build of {} failed (see the output above)".format(engine, tag))
        seconds = time.monotonic() - started
        if reports is not None:
            keep_sbom(engine, tag, reports)
        if args.audit and not audit_image(engine, tag, args, reports):
            failed_audits.append(tag)
            continue  # never push an image that failed its audit
        if args.push and subprocess.run([engine, "push", tag]).returncode != 0:
            raise BuildError("{} push of {} failed".format(engine, tag))
        built.append((tag, image_size(engine, tag), seconds))
    for tag, size, seconds in built:
        print("{}  {:.0f} MB  built in {:.0f}s".format(tag, size / 1e6, seconds))
    if failed_audits:
        raise BuildError("{} failed the audit (--fail-on {}, scope {}): see its report above".format(
            ", ".join(failed_audits), args.fail_on, args.scope))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="images.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser(
        "build",
        help="build the images (all, or the NAMEs); flags after -- go to the engine's build command",
        usage="build.sh [--engine docker|podman] [--line exact|patched|both] [--base-image IMAGE] [--registry PREFIX] "
              "[--push] [--reports DIR] [--audit OSV_DIR [--fail-on LEVEL] [--scope all|serving]] [NAME...] [-- FLAGS...]",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="machine-learning, deep-learning, python-38, python-39")
    p.add_argument("--engine", choices=ENGINES, help="container engine (default: docker if its engine runs, else podman)")
    p.add_argument("--line", choices=LINES + ("both",), default="exact", help="exact: the documented tags and "
                   "libraries (default); patched: the tag one patch above, serving stack moved to fixed releases")
    p.add_argument("--base-image", metavar="IMAGE", help="base image of the named images (default: python:3.X-slim)")
    p.add_argument("--registry", metavar="PREFIX", help="tag PREFIX/md-base/python/NAME:VERSION")
    p.add_argument("--push", action="store_true", help="push each image after building it (and passing its audit)")
    p.add_argument("--reports", metavar="DIR", help="write each image's SBOM (and audit report) to DIR")
    p.add_argument("--audit", metavar="OSV_DIR", help="audit each image against a directory of OSV advisories, offline "
                   "(dockerfiles/advisories, or an osv.dev export), or `pip-audit` to ask PyPI's, online")
    p.add_argument("--fail-on", default="never", choices=("never", "any", "low", "moderate", "high", "critical"),
                   help="with --audit: fail (and push nothing) when an advisory this severe covers a package")
    p.add_argument("--scope", default="all", choices=("all", "serving"), help="with --fail-on: count every package, "
                   "or the serving stack only (an OSV directory; pip-audit counts every package, at any severity)")
    p.set_defaults(func=build)

    p = commands.add_parser("pins", help="print an image's pins for one line, as a requirements file (image builds)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--line", choices=LINES, default="exact")
    p.add_argument("--tools", action="store_true", help="only " + ", ".join(TOOLS))
    p.set_defaults(func=list_pins)

    p = commands.add_parser("verify-pins", help="check that the installed versions are an image's pins (image builds)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--line", choices=LINES, default="exact")
    p.set_defaults(func=verify_pins)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    engine_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    args.engine_flags = engine_flags
    try:
        return int(args.func(args))
    except BuildError as exc:
        print("build.sh: error: {}".format(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
