"""CLI: `md-runtime`, the last stage. Parses flags (derived from Settings), then hands over to gunicorn.

Every start-up failure ends with one line on stderr, `md-runtime: error: ...`, and a non-zero exit:
4 when package.py cannot be loaded, 3 for any other boot failure, 2 for a wrong command line.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from . import __version__, overrides
from .audit import FAIL_ON
from .errors import WORKER_BOOT_ERROR, AdvisoriesFoundError, DeploymentError, MdError
from .settings import describe, read_settings, to_environ

if TYPE_CHECKING:  # pragma: no cover
    from . import lifecycle
    from .deployment import DeploymentParams

DOCKER_RUN_PLACEHOLDER = "$PWD/my_model"
AUTO = "auto"
DEFAULT_CPU = 100  # millicores, the platform's default
MEMORY_TABLE_WORKERS = 4  # `check` lists the replica memory for 1..this many workers, or the CPUs here if more


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (a --X/--no-X switch for on/off ones); values stay strings so that Settings
    validates flags and env alike."""
    for info in describe():
        if info.name == "model_dir":
            continue
        flag, text = "--" + info.name.replace("_", "-"), "{} [env {}; default {}]".format(info.description, info.env, info.default)
        if info.type_name == "bool":
            parser.add_argument(flag, dest=info.name, action="store_const", const="true",
                                help=text.replace(" [env", " (--no-{} turns it off) [env".format(flag[2:]), 1))
            parser.add_argument("--no-" + flag[2:], dest=info.name, action="store_const", const="false",
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=info.name, metavar=info.type_name.upper(), help=text)


def _flag_values(args: argparse.Namespace) -> Dict[str, Any]:
    values = {info.name: getattr(args, info.name, None) for info in describe()}
    return {k: v for k, v in values.items() if v is not None}


def serve(args: argparse.Namespace) -> int:
    from . import logs
    from .boot import make_plan

    settings = read_settings(os.environ, **_flag_values(args))
    logs.configure(settings)
    plan = make_plan(settings, os.environ)
    sys.stdout.flush()
    # gunicorn becomes this process (so signals reach it directly), inside the model's overlay if it has one
    os.execve(plan.python, plan.argv, plan.env)
    return 0  # pragma: no cover


def env_command(args: argparse.Namespace) -> int:
    from . import logs
    from .boot import prepare_overlay

    settings = read_settings(os.environ, **_flag_values(args))
    logs.configure(settings)
    overlay = prepare_overlay(settings)
    if overlay is None:
        print("{} has no requirements.txt: the base environment serves it as it is".format(settings.model_dir))
        return 0
    source = "from the cache" if overlay.from_cache else "built in {:.1f}s, {} attempt(s)".format(overlay.install_seconds, overlay.attempts)
    print("overlay {} ({})".format(overlay.path, source))
    for name, version in overlay.overrides:
        print("  {}=={}".format(name, version))
    return 0


def check(args: argparse.Namespace) -> int:
    from . import logs
    from .boot import check_model_dir, prepare_overlay
    from .boot.resources import default_workers
    from .checks import run_check
    from .master import memory_table

    settings = read_settings(os.environ, model_dir=args.model_dir, log_level="warning")
    logs.configure(settings)
    check_model_dir(settings.model_dir)
    if not args.no_overlay:
        overlay = prepare_overlay(settings)
        if overlay is not None:  # check with the libraries serve would run, inside the overlay's Python
            print("environment: overlay {} ({})".format(overlay.path, _describe_overrides(overlay)))
            sys.stdout.flush()
            argv = [str(overlay.python), "-m", "md_runtime.cli", "check", str(settings.model_dir), "--no-overlay"]
            argv += (["--sample", args.sample] if args.sample else []) + (["--workers", str(args.workers)] if args.workers else [])
            os.execv(str(overlay.python), argv)
    memory, model = memory_table(settings, args.workers or max(MEMORY_TABLE_WORKERS, default_workers()))
    for line in run_check(settings.model_dir, Path(args.sample) if args.sample else None, model) + memory:
        print(line)
    print("ok: {} keeps the package.py contract".format(settings.model_dir))
    return 0


def _describe_overrides(overlay: "overrides.Overlay") -> str:
    return ", ".join("{}=={}".format(name, version) for name, version in overlay.overrides) or "nothing new"


def freeze(args: argparse.Namespace) -> int:
    """Pin what the model needs, as installed here, into its requirements.txt."""
    from . import logs, versions
    from .loader import load_model

    model_dir = Path(args.model_dir)
    logs.configure(read_settings(os.environ, model_dir=model_dir, log_level="warning"))
    loaded = load_model(model_dir)
    pins = versions.freeze_lines(versions.imported_modules(loaded.model_dir) | versions.held_modules(loaded.model))
    if args.print:
        print("\n".join(pins))
        return 0
    target = loaded.model_dir / "requirements.txt"
    existing = target.read_text() if target.is_file() else ""
    target.write_text(versions.merge_requirements(existing, pins))
    print("wrote {}: {}".format(target, ", ".join(pins) or "nothing to pin"))
    return 0


def _deployment_params(args: argparse.Namespace, model_dir: Optional[str]) -> "DeploymentParams":
    from .deployment import make_params

    memory = measured_memory(model_dir, args.cpu) if args.memory == AUTO else args.memory
    return make_params(derived_image=True, image_uri=args.image, cpu=args.cpu, memory=memory,
                       replicas=args.replicas, active=False if getattr(args, "inactive", False) else None)


def measured_memory(model_dir: Optional[str], cpu: Optional[int]) -> int:
    """--memory auto: what `md-runtime check` measures for the workers a replica with `cpu` millicores starts."""
    import math
    import re
    import subprocess

    if not model_dir or model_dir == DOCKER_RUN_PLACEHOLDER:
        raise DeploymentError("--memory auto measures the model: pass its directory ({})".format(
            "MODEL_DIR" if model_dir == DOCKER_RUN_PLACEHOLDER else "--model-dir DIR"))
    workers = max(1, math.ceil((cpu or DEFAULT_CPU) / 1000))  # a replica starts a worker per CPU of its quota
    done = subprocess.run([sys.executable, "-m", "md_runtime.cli", "check", model_dir, "--workers", str(workers)],
                          capture_output=True, text=True)
    asks = re.findall(r"deploy with memory=(\d+)", done.stdout)
    if done.returncode != 0 or not asks:
        reason = (done.stderr.strip().splitlines() or ["no memory measured"])[-1].replace("md-runtime: error: ", "")
        raise DeploymentError("--memory auto: `md-runtime check {}` failed: {}".format(model_dir, reason))
    print("memory auto: {} MiB for {} worker(s), as `md-runtime check {}` measured it here".format(
        asks[-1], workers, model_dir), file=sys.stderr)
    return int(asks[-1])


def _memory_value(text: str) -> Union[int, str]:
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("memory is a whole number of MiB, or auto") from None


def k8s(args: argparse.Namespace) -> int:
    from .deployment import to_yaml

    current = _read_stored(args) if args.from_file else None
    sys.stdout.write(to_yaml(_updated(args, current).manifests(args.name)))
    return 0


def deploy(args: argparse.Namespace) -> int:
    """kubectl get, merge, apply, and wait for the rollout; --dry-run stops before applying."""
    from . import lifecycle
    from .deployment import to_yaml

    kubectl = lifecycle.Kubectl(args.context, args.namespace)
    current: Optional[lifecycle.Stored] = None
    if args.from_file:
        current = _read_stored(args)
    else:
        found = kubectl.get_deployment(args.name)
        current = lifecycle.stored(found, "the cluster's Deployment " + args.name) if found else None
    after = _updated(args, current)
    for line in lifecycle.diff(current, after):
        _progress(line)
    manifests = to_yaml(after.manifests(args.name))
    if args.dry_run:
        _progress("dry run: nothing applied to kubeconfig context {}".format(kubectl.context_name()))
        sys.stdout.write(manifests)
        return 0
    _progress(last_line_of(kubectl.run("apply", "--filename", "-", stdin=manifests).stdout))
    ready = lifecycle.wait_for_rollout(kubectl, args.name, args.timeout, _progress)
    _progress("{}: {} replica(s) ready".format(args.name, ready))
    return 0


def _read_stored(args: argparse.Namespace) -> "lifecycle.Stored":
    from . import lifecycle

    return lifecycle.read_stored(args.name, args.from_file, sys.stdin)


def _progress(line: str) -> None:
    print("---> " + line, file=sys.stderr, flush=True)


def last_line_of(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


def _updated(args: argparse.Namespace, current: "Optional[lifecycle.Stored]") -> "lifecycle.Stored":
    """The stored values with only the flags given changed; a first deployment needs --image."""
    from . import lifecycle
    from .deployment import Autoscale

    if current is None and not args.image:
        raise DeploymentError("--image is required for a first deployment (there are no stored values to update: "
                              "pass --from FILE, or deploy to a cluster that has it)")
    cpu = args.cpu or (current.params.cpu if current else None)
    memory = measured_memory(args.model_dir, cpu) if args.memory == AUTO else args.memory
    active = True if args.active else False if args.inactive else None
    source, ref = ("image", args.model_image) if args.model_image else ("pvc", args.model_pvc) if args.model_pvc else (None, None)
    changes = dict(image_uri=args.image, cpu=args.cpu, memory=memory, replicas=args.replicas, active=active)
    return lifecycle.update(current, changes, source, ref, args.env_cache_pvc,
                            Autoscale.parse(args.autoscale) if args.autoscale else None, args.no_autoscale)


def docker_run(args: argparse.Namespace) -> int:
    from .deployment import docker_run_line

    model_dir = args.model_dir
    if model_dir != DOCKER_RUN_PLACEHOLDER:  # docker takes a relative path for a named volume: make it absolute
        path = Path(model_dir).resolve()
        if not (path / "package.py").is_file():
            raise DeploymentError("{} is not a model directory (no package.py there); pass the path of yours".format(path))
        model_dir = str(path)
    print(docker_run_line(_deployment_params(args, model_dir), model_dir, args.port))
    return 0


def _add_lifecycle_flags(parser: argparse.ArgumentParser) -> None:
    """k8s's and deploy's flags: the deployment's values, each changed only when given."""
    parser.add_argument("--from", dest="from_file", metavar="FILE", help="the deployment as it is (kubectl get deployment "
                        "NAME -o json, or md-runtime k8s's YAML; - for standard input): its stored values are kept "
                        "except the flags given")
    _add_deployment_flags(parser, image_required=False)
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--active", action="store_true", help="scale up again, with the stored cpu, memory and replicas")
    state.add_argument("--inactive", action="store_true", help="zero pods; cpu, memory and replicas are kept in annotations")
    scaling = parser.add_mutually_exclusive_group()
    scaling.add_argument("--autoscale", metavar="MIN-MAX[@PCT]", help="a HorizontalPodAutoscaler on CPU between MIN and "
                         "MAX replicas (1-10), at PCT%% of the CPU requested (default 70)")
    scaling.add_argument("--no-autoscale", action="store_true", help="stop autoscaling: the stored replicas again")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model-pvc", metavar="CLAIM", help="PersistentVolumeClaim holding the model directory (default NAME-model)")
    model.add_argument("--model-image", metavar="IMAGE", help="image whose /model an init container copies into the pod")
    parser.add_argument("--model-dir", metavar="DIR", help="a copy of the model directory, measured for --memory auto")
    parser.add_argument("--env-cache-pvc", metavar="CLAIM", help="ReadWriteMany claim for the overlay cache, shared by replicas (default: emptyDir per pod)")


def _add_deployment_flags(parser: argparse.ArgumentParser, image_required: bool = True) -> None:
    parser.add_argument("--image", required=image_required, metavar="IMAGE_URI", help="an md-base image, e.g. "
                        "md-base/python/machine-learning:1.1.0{}".format("" if image_required else " (kept when updating)"))
    parser.add_argument("--cpu", type=int, metavar="MILLICORES", help="CPU per replica, 10-4000 (default 100)")
    parser.add_argument("--memory", type=_memory_value, metavar="MIB", help="memory per replica, 150-16384 (default "
                        "256), or auto: what `md-runtime check` measures the model to need here, for a worker per CPU")
    parser.add_argument("--replicas", type=int, metavar="N", help="pods while active, 1-10 (default 1)")


def templates_root() -> Path:
    """package_py_templates/: inside the installed wheel as md_runtime/templates, or beside runtime/ in a checkout."""
    installed = Path(__file__).parent / "templates"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "package_py_templates"


def template_names() -> List[str]:
    root = templates_root()
    return sorted(p.name for p in root.iterdir() if (p / "package.py").is_file()) if root.is_dir() else []


def init(args: argparse.Namespace) -> int:
    source = templates_root() / args.template
    target = Path(args.model_dir)
    clashes = [target / f.name for f in source.iterdir() if (target / f.name).exists()]
    if clashes:
        raise MdError("{} already has {}: init never overwrites; choose a new directory".format(
            target, ", ".join(sorted(c.name for c in clashes))))
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file():
            shutil.copy2(str(item), str(target / item.name))
            print("created {}".format(target / item.name))
    print("next: put your model's files in {0}, edit the CHANGE lines of package.py, then "
          "`md-runtime check {0}` and `md-runtime serve {0}`".format(target))
    return 0


def config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_table())
        return 0
    values = to_environ(read_settings(os.environ))
    for info in describe():
        print("{}={}".format(info.env, values.get(info.env, "")))
    return 0


def sbom_command(args: argparse.Namespace) -> int:
    from . import sbom

    if args.image:  # the image build writes it: what pip and dpkg report now, named as the image
        sbom.write_sbom(sbom.make_sbom(sbom.installed(), args.image), args.output)
    else:
        sbom.write_sbom(sbom.this_sbom(), args.output)
    return 0


def audit_command(args: argparse.Namespace) -> int:
    from . import audit, sbom

    document = sbom.read_sbom(Path(args.sbom)) if args.sbom else sbom.this_sbom()
    packages = sbom.packages_from_sbom(document)
    advisories = audit.load_advisories(Path(args.osv))
    findings = audit.audit(packages, advisories)
    print(audit.render(audit.report_rows(findings), len(packages), len(advisories), args.format))
    failed = audit.failing(findings, args.fail_on, args.scope)
    if failed:
        names = sorted({"{} {}".format(f.package.name, f.package.version) for f in failed})
        raise AdvisoriesFoundError("{} advisor{} at --fail-on {} (scope {}) cover {}: move them to the versions the "
                                   "table gives as outside them".format(len(failed), "y" if len(failed) == 1 else "ies",
                                                                        args.fail_on, args.scope, ", ".join(names)))
    return 0


def settings_table() -> str:
    """The README's settings table, generated from the Settings fields."""
    rows = ["| variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for info in describe():
        flag = "MODEL_DIR argument" if info.name == "model_dir" else "`--{}`".format(info.name.replace("_", "-"))
        default = "(derived)" if info.default is None else "`{}`".format(info.default)
        rows.append("| `{}` | {} | {} | {} |".format(info.env, flag, default, info.description))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="md-runtime",
        description="Serve a model directory (package.py + files) over HTTP under gunicorn with gevent workers.",
    )
    parser.add_argument("--version", action="version", version="md-runtime " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser("serve", help="serve MODEL_DIR: /predict, /invocations, /v2 (Open Inference Protocol), "
                            "/explain, /health, /ready, /ping, /info, /metrics, /openapi.json")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="model directory [env MD_MODEL_DIR; default /app/model]")
    _add_setting_flags(p)
    p.set_defaults(func=serve)

    p = commands.add_parser("check", help="load MODEL_DIR as serve would (in its requirements.txt overlay) and "
                            "predict on sample rows; exit 0 only when the contract holds on them")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--sample", metavar="FILE", help="rows to predict, .csv or .json (records or split); default: "
                   "MODEL_DIR/sample.csv or sample.json, else rows generated from model.yaml's inputs")
    p.add_argument("--workers", type=int, metavar="N", help="list the replica memory for 1..N workers (default: 4, or "
                   "the CPUs here if more)")
    p.add_argument("--no-overlay", action="store_true", help="check in this environment as it is, without "
                   "installing requirements.txt into its overlay first")
    p.set_defaults(func=check)

    p = commands.add_parser("freeze", help="pin the libraries MODEL_DIR's package.py imports and its model holds, "
                            "at the versions installed here, in its requirements.txt")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--print", action="store_true", help="print the lines instead of writing requirements.txt")
    p.set_defaults(func=freeze)

    p = commands.add_parser("env", help="prepare MODEL_DIR's requirements.txt overlay without serving (to bake it)")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="model directory [env MD_MODEL_DIR; default /app/model]")
    _add_setting_flags(p)
    p.set_defaults(func=env_command)

    p = commands.add_parser("init", help="start a new model directory from a package.py template")
    p.add_argument("--template", required=True, choices=template_names(), help="framework of the template")
    p.add_argument("model_dir", metavar="DIR", help="new model directory (never overwritten)")
    p.set_defaults(func=init)

    p = commands.add_parser("k8s", help="print Kubernetes YAML (Deployment + Service) for a deployment, or for an update "
                            "of one (--from)")
    p.add_argument("name", metavar="NAME", help="deployment name (a DNS label)")
    _add_lifecycle_flags(p)
    p.set_defaults(func=k8s)

    p = commands.add_parser("deploy", help="update a deployment in the cluster with only the values given (kubectl get, "
                            "merge, apply) and wait for its rollout")
    p.add_argument("name", metavar="NAME", help="deployment name (a DNS label)")
    _add_lifecycle_flags(p)
    p.add_argument("--context", metavar="CONTEXT", help="kubeconfig context (default: the current one)")
    p.add_argument("--namespace", metavar="NAMESPACE", help="namespace (default: the context's)")
    p.add_argument("--dry-run", action="store_true", help="print what would change and the manifests; apply nothing")
    p.add_argument("--timeout", type=float, default=1500, metavar="SECONDS", help="how long the rollout may take "
                   "(default 1500: the startup probe's 20 minutes for a requirements install, and a margin)")
    p.set_defaults(func=deploy)

    p = commands.add_parser("docker-run", help="print the `docker run` line for one replica of a deployment")
    p.add_argument("model_dir", nargs="?", default=DOCKER_RUN_PLACEHOLDER, metavar="MODEL_DIR",
                   help="the model directory (default: a placeholder to edit)")
    _add_deployment_flags(p)
    p.add_argument("--port", type=int, default=8080, help="host port (default 8080)")
    p.set_defaults(func=docker_run)

    p = commands.add_parser("sbom", help="print this image's SBOM (CycloneDX JSON of the pip and Debian packages in it), "
                            "or one made now from this environment outside an image")
    p.add_argument("--output", "-o", metavar="FILE", help="write it to FILE instead of standard output")
    p.add_argument("--image", metavar="NAME:VERSION", help="make it now from this environment, naming the image it "
                   "describes (what the image build runs)")
    p.set_defaults(func=sbom_command)

    p = commands.add_parser("audit", help="match this image's packages (or an SBOM's) against a directory of OSV "
                            "advisories, offline; print the affected ones and the lowest versions outside them")
    p.add_argument("--osv", required=True, metavar="DIR", help="OSV records, .json or .yaml (e.g. a clone of "
                   "github.com/pypa/advisory-database, or osv.dev's PyPI and Debian exports unzipped)")
    p.add_argument("--sbom", metavar="FILE", help="the SBOM to check (default: this image's, see `md-runtime sbom`)")
    p.add_argument("--fail-on", choices=FAIL_ON, default="never", help="exit 1 when an advisory of this "
                   "severity or higher covers a package (any: whatever the severity; unrated ones always count)")
    p.add_argument("--scope", choices=("all", "serving"), default="all", help="which packages --fail-on counts: all, "
                   "or the serving stack only (gunicorn, Werkzeug, Flask, gevent, pip, setuptools, ...)")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown", help="the report's form")
    p.set_defaults(func=audit_command)

    p = commands.add_parser("config", help="print the effective settings (MD_* variables)")
    p.add_argument("--markdown", action="store_true", help="print the settings reference table instead")
    p.set_defaults(func=config)
    return parser


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """Like parse_args, but a flag the command does not know is reported with that command's usage."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error("unrecognized arguments: " + " ".join(unknown))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    try:
        return int(args.func(args))
    except MdError as exc:
        print("md-runtime: error: {}".format(exc.message), file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file or directory no stage names more precisely: still one line
        print("md-runtime: error: {}".format(exc), file=sys.stderr)
        return WORKER_BOOT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
