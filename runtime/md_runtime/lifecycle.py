"""Lifecycle: a deployment after its first render. The values the platform stores for it (image, cpu, memory,
replicas, active, autoscaling) live in the Deployment itself, in its `md-base/*` annotations and pod spec; an
update reads them back (from a file, or from the cluster through kubectl), changes only what is given, and
renders the whole set again, so that scaling down keeps what scaling up restores.
"""

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, TextIO

from .deployment import ANNOTATION, Autoscale, DeploymentParams, k8s_manifests, make_params, update_params
from .errors import DeploymentError

CONTAINER = "model-server"


class Stored(NamedTuple):
    """Everything a render needs: the parameters and where the model and the overlay cache come from."""

    params: DeploymentParams
    model_source: str = "pvc"
    model_ref: Optional[str] = None
    env_cache_claim: Optional[str] = None
    autoscale: Optional[Autoscale] = None

    def manifests(self, name: str) -> List[Dict[str, Any]]:
        return k8s_manifests(name, self.params, self.model_source, self.model_ref, self.env_cache_claim, self.autoscale)

    def values(self) -> Dict[str, str]:
        """The stored values, as the annotations hold them, for a diff."""
        values = dict(image=self.params.image_uri, replicas=str(self.params.replicas), cpu=str(self.params.cpu),
                      memory=str(self.params.memory), active=str(self.params.active).lower())
        values["autoscale"] = str(self.autoscale) if self.autoscale else "off"
        return values


def parse_objects(text: str, origin: str) -> List[Dict[str, Any]]:
    """Kubernetes objects from JSON (`kubectl get -o json`, a List too) or YAML (`md-runtime k8s`'s output)."""
    try:
        documents: List[Any] = [json.loads(text)]
    except ValueError:
        try:
            import yaml
        except ImportError:  # pragma: no cover - PyYAML is in every image and in the test environment
            raise DeploymentError("{} is not JSON, and reading YAML needs PyYAML: pip install pyyaml".format(origin)) from None
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise DeploymentError("{} is neither JSON nor YAML: {}".format(origin, str(exc).splitlines()[0])) from None
    objects = []
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == "List":
            objects += [item for item in document.get("items") or [] if isinstance(item, dict)]
        elif isinstance(document, dict):
            objects.append(document)
    return objects


def read_stored(name: str, path: str, stdin: TextIO) -> Stored:
    """The values stored in the Deployment NAME of the file at `path` (`-`: standard input)."""
    origin = "standard input" if path == "-" else path
    try:
        text = stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise DeploymentError("cannot read {}: {}".format(origin, exc.strerror)) from None
    return stored(find_deployment(parse_objects(text, origin), name, origin), origin)


def find_deployment(objects: List[Dict[str, Any]], name: str, origin: str) -> Dict[str, Any]:
    for found in objects:
        if found.get("kind") == "Deployment" and (found.get("metadata") or {}).get("name") == name:
            return found
    names = [str((o.get("metadata") or {}).get("name")) for o in objects if o.get("kind") == "Deployment"]
    raise DeploymentError("{} holds no Deployment named {!r}{}".format(
        origin, name, " (it has {})".format(", ".join(names)) if names else ""))


def stored(deployment: Dict[str, Any], origin: str) -> Stored:
    """The values a Deployment rendered by md-runtime stores, checked as a new deployment's would be."""
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    container = next((c for c in pod.get("containers") or [] if c.get("name") == CONTAINER), None)
    if container is None or ANNOTATION + "cpu" not in annotations:
        raise DeploymentError("{} is not a Deployment md-runtime rendered (no {} container or {}* annotations); "
                              "render it first with `md-runtime k8s`".format(origin, CONTAINER, ANNOTATION))
    fields = {field: annotations.get(ANNOTATION + field) for field in ("replicas", "cpu", "memory")}
    try:  # a value edited by hand is named, not replaced by the default
        params = make_params(derived_image=True, image_uri=container.get("image"),
                             active=annotations.get(ANNOTATION + "active") != "false", **fields)
    except DeploymentError as exc:
        raise DeploymentError("{}'s stored values: {}".format(origin, exc.message)) from None
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    model_claim = (volumes.get("model") or {}).get("persistentVolumeClaim")
    model_image = next((c.get("image") for c in pod.get("initContainers") or [] if c.get("name") == "model-files"), None)
    cache_claim = (volumes.get("env-cache") or {}).get("persistentVolumeClaim")
    autoscale = annotations.get(ANNOTATION + "autoscale")
    return Stored(params, "image" if model_image else "pvc", model_image or (model_claim or {}).get("claimName"),
                  (cache_claim or {}).get("claimName"), Autoscale.parse(autoscale) if autoscale else None)


def update(current: Optional[Stored], changes: Dict[str, Any], model_source: Optional[str] = None,
           model_ref: Optional[str] = None, env_cache_claim: Optional[str] = None,
           autoscale: Optional[Autoscale] = None, no_autoscale: bool = False) -> Stored:
    """`current` with only the given changes (None: not given); a first deployment when there is none."""
    if current is None:
        params = make_params(derived_image=True, **changes)
        return Stored(params, model_source or "pvc", model_ref, env_cache_claim, autoscale)
    given = {field: value for field, value in changes.items() if value is not None}
    params = update_params(current.params, derived_image=True, **given) if given else current.params
    if model_source is None:
        model_source, model_ref = current.model_source, current.model_ref
    return Stored(params, model_source, model_ref, env_cache_claim or current.env_cache_claim,
                  None if no_autoscale else autoscale or current.autoscale)


def diff(before: Optional[Stored], after: Stored) -> List[str]:
    """A line per stored value: `cpu: 250 -> 500`, or `memory: 512` when it is kept."""
    old = before.values() if before else {}
    return ["{}: {} -> {}".format(key, old[key], value) if key in old and old[key] != value else
            "{}: {}{}".format(key, value, "" if key in old else " (new)") for key, value in after.values().items()]


# --- kubectl ----------------------------------------------------------------------------------------------


class Kubectl:
    """The user's kubectl and kubeconfig, with --context and --namespace when given."""

    def __init__(self, context: Optional[str] = None, namespace: Optional[str] = None, executable: str = "kubectl") -> None:
        self.context, self.namespace, self.executable = context, namespace, executable

    def run(self, *args: str, stdin: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
        command = [self.executable] + (["--context", self.context] if self.context else []) + \
            (["--namespace", self.namespace] if self.namespace else []) + list(args)
        try:
            done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise DeploymentError("kubectl is not installed (or not on PATH): install it, or render with "
                                  "`md-runtime k8s` and apply the manifests yourself") from None
        if check and done.returncode != 0:
            raise DeploymentError("kubectl {} failed on context {}: {}".format(args[0], self.context_name(), last_line(done.stderr)))
        return done

    def context_name(self) -> str:
        if self.context:
            return repr(self.context)
        done = subprocess.run([self.executable, "config", "current-context"], capture_output=True, text=True)
        return repr(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else "(none set in the kubeconfig)"

    def get_deployment(self, name: str) -> Optional[Dict[str, Any]]:
        """The Deployment as the cluster has it; None if there is none yet."""
        done = self.run("get", "deployment", name, "--output", "json", "--request-timeout", "20s", check=False)
        if done.returncode == 0:
            try:
                return json.loads(done.stdout)
            except ValueError:
                raise DeploymentError("kubectl get deployment {} printed no JSON: {}".format(name, last_line(done.stdout))) from None
        if "NotFound" in done.stderr or "not found" in done.stderr:
            return None
        raise DeploymentError("cannot reach the cluster of kubeconfig context {}: {}".format(
            self.context_name(), last_line(done.stderr)))


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


def wait_for_rollout(kubectl: Kubectl, name: str, timeout: float, say: Callable[[str], None],
                     poll_seconds: float = 2.0) -> int:
    """Until the cluster has seen the new spec and every replica it wants (ours, or the autoscaler's count) is
    of the new revision and ready, saying each change; the replicas. On timeout, the pods' reason in one line."""
    deadline, said = time.monotonic() + timeout, None
    while True:
        deployment = kubectl.get_deployment(name) or {}
        spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
        wanted = spec.get("replicas", 1)
        ready, updated, pods = (status.get(key) or 0 for key in ("readyReplicas", "updatedReplicas", "replicas"))
        seen = status.get("observedGeneration", 0) >= (deployment.get("metadata") or {}).get("generation", 0)
        if (ready, updated, wanted) != said:
            say("{}/{} replica(s) ready, {} of the new revision".format(ready, wanted, updated))
            said = (ready, updated, wanted)
        if seen and ready == wanted and updated >= wanted and pods == wanted:
            return wanted
        if time.monotonic() > deadline:
            raise DeploymentError("the rollout of {} did not finish in {:g} s: {}".format(name, timeout, pod_trouble(kubectl, name)))
        time.sleep(poll_seconds)


def pod_trouble(kubectl: Kubectl, name: str) -> str:
    """Why the pods are not ready, in one line: a waiting or last-terminated reason, with the container's last
    `md-runtime: error:` line when its log has one."""
    done = kubectl.run("get", "pods", "--selector", "app.kubernetes.io/name=" + name, "--output", "json", check=False)
    pods = json.loads(done.stdout).get("items", []) if done.returncode == 0 else []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            ended = (status.get("lastState") or {}).get("terminated") or {}
            reason = ended.get("reason") if ended.get("reason") == "OOMKilled" else waiting.get("reason") or ended.get("reason")
            if reason:
                pod_name = pod["metadata"]["name"]
                return "pod {}: {}{}".format(pod_name, reason, runtime_error(kubectl, pod_name))
    return "no pod reports a reason; see `kubectl describe deployment {}`".format(name)


def runtime_error(kubectl: Kubectl, pod: str) -> str:
    logs = kubectl.run("logs", pod, "--container", CONTAINER, "--previous", "--tail", "50", check=False).stdout
    errors = [line for line in logs.splitlines() if line.startswith("md-runtime: error:")]
    return " ({})".format(errors[-1]) if errors else ""
