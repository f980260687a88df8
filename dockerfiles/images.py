"""The md-base images: build them (behind build.sh) and verify their pins (inside each image's build).

Standard library only, Python 3.8+: it runs on the host that builds the images, where md-runtime may not be
installed, and inside each image with its own Python.
"""

import argparse
import configparser
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPOSITORY = "md-base/python"
ENGINES = ("docker", "podman")


class Image(NamedTuple):
    name: str
    version: str
    python: str
    base: str
    apt: str

    def tag(self, registry: Optional[str]) -> str:
        tag = "{}/{}:{}".format(REPOSITORY, self.name, self.version)
        return "{}/{}".format(registry.rstrip("/"), tag) if registry else tag

    @property
    def pins_file(self) -> Path:
        return HERE / "pins" / "{}.txt".format(self.name)


class BuildError(Exception):
    pass


def read_images(path: Path = HERE / "images.ini") -> Dict[str, Image]:
    parser = configparser.ConfigParser()
    parser.read(str(path))
    return {
        name: Image(name, section["version"], section["python"], section["base"], section.get("apt", "").strip())
        for name, section in parser.items()
        if name != configparser.DEFAULTSECT
    }


def normalize(name: str) -> str:
    """PEP 503: scikit_learn, Scikit.Learn and scikit-learn are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> Dict[str, str]:
    """name -> version for every `name==version` line of a pins file and the files it includes with -r."""
    pins = {}  # type: Dict[str, str]
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins.update(read_pins(path.parent / line[3:].strip()))
        elif line:
            name, _, version = line.partition("==")
            if not version:
                raise BuildError("{}: {!r} is not pinned with ==".format(path, line))
            pins[normalize(name)] = version.strip()
    return pins


def pin_problems(pins: Dict[str, str]) -> List[str]:
    from importlib import metadata

    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = []
    for name, version in sorted(pins.items()):
        if installed.get(name) != version:
            problems.append("{}=={} is pinned but {} is installed".format(name, version, installed.get(name, "nothing")))
    if "md-runtime" not in installed:
        problems.append("md-runtime is not installed")
    return problems


def verify_pins(args: argparse.Namespace) -> int:
    problems = pin_problems(read_pins(Path(args.pins)))
    for problem in problems:
        print("verify-pins: " + problem, file=sys.stderr)
    if problems:
        print("verify-pins: error: pip resolved versions other than the pins in {}".format(args.pins), file=sys.stderr)
        return 1
    print("verify-pins: all {} pins of {} hold".format(len(read_pins(Path(args.pins))), args.pins))
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


def build_command(engine: str, image: Image, tag: str, base: str, extra: Sequence[str]) -> List[str]:
    pins = ",".join("{}=={}".format(n, v) for n, v in sorted(read_pins(image.pins_file).items()))
    command = [engine, "build", "-f", str(HERE / "Dockerfile"), "-t", tag]
    if engine == "podman":
        command += ["--format", "docker"]  # the OCI format has no HEALTHCHECK
    for key, value in (
        ("BASE_IMAGE", base),
        ("IMAGE_NAME", image.name),
        ("IMAGE_VERSION", image.version),
        ("PYTHON_VERSION", image.python),
        ("APT_PACKAGES", image.apt),
        ("PINS", pins),
    ):
        command += ["--build-arg", "{}={}".format(key, value)]
    return command + list(extra) + [str(HERE.parent)]


def image_size(engine: str, tag: str) -> int:
    done = subprocess.run([engine, "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True)
    return int(done.stdout.strip() or 0)


def build(args: argparse.Namespace) -> int:
    images = read_images()
    unknown = [name for name in args.names if name not in images]
    if unknown:
        raise BuildError("unknown image {}: choose from {}".format(", ".join(unknown), ", ".join(images)))
    engine = args.engine or detect_engine()
    chosen = [images[name] for name in (args.names or list(images))]
    built = []
    for image in chosen:
        tag = image.tag(args.registry)
        command = build_command(engine, image, tag, args.base_image or image.base, args.engine_flags)
        print("---> building {} on {}".format(tag, args.base_image or image.base), flush=True)
        started = time.monotonic()
        if subprocess.run(command).returncode != 0:
            raise BuildError("{} build of {} failed (see the output above)".format(engine, tag))
        seconds = time.monotonic() - started
        if args.push and subprocess.run([engine, "push", tag]).returncode != 0:
            raise BuildError("{} push of {} failed".format(engine, tag))
        built.append((tag, image_size(engine, tag), seconds))
    for tag, size, seconds in built:
        print("{}  {:.0f} MB  built in {:.0f}s".format(tag, size / 1e6, seconds))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="images.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser(
        "build",
        help="build the images (all, or the NAMEs); flags after -- go to the engine's build command",
        usage="build.sh [--engine docker|podman] [--base-image IMAGE] [--registry PREFIX] [--push] [NAME...] [-- FLAGS...]",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="machine-learning, deep-learning, python-38, python-39")
    p.add_argument("--engine", choices=ENGINES, help="container engine (default: docker if its engine runs, else podman)")
    p.add_argument("--base-image", metavar="IMAGE", help="base image of the named images (default: python:3.X-slim)")
    p.add_argument("--registry", metavar="PREFIX", help="tag PREFIX/md-base/python/NAME:VERSION")
    p.add_argument("--push", action="store_true", help="push each image after building it")
    p.set_defaults(func=build)

    p = commands.add_parser("verify-pins", help="check that the installed versions are the pins (run inside a build)")
    p.add_argument("pins", metavar="PINS_FILE")
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
