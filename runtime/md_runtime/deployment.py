"""Deployment parameters (image_uri, cpu, memory, replicas, active) and what they become outside the
container: Kubernetes manifests and a local `docker run` line. Works with pydantic 1.10 and 2.x.
"""

import json
import logging
import math
import re
from typing import Any, Dict, List, NamedTuple, Optional

from pydantic import BaseModel, Field, ValidationError

from .errors import DeploymentError
from .settings import Settings, read_settings

log = logging.getLogger("md_runtime.deployment")

# dockerfiles/images.ini lists the same images (a test keeps the two in step).
KNOWN_IMAGES = (
    "md-base/python/machine-learning:1.1.0",
    "md-base/python/deep-learning:1.2.0",
    "md-base/python/python-38:1.1.0",
    "md-base/python/python-39:1.1.0",
)
# The platform's limits: (minimum, maximum, unit).
LIMITS = {"replicas": (1, 10, "replicas"), "cpu": (10, 4000, "millicores"), "memory": (150, 16384, "MiB")}
MODEL_MOUNT = "/app/model"
CACHE_MOUNT = "/cache"
TMP_MOUNT = "/tmp"  # with /cache, all the image's filesystem that is writable
# The image runs as its user 1000 on a read-only root with no capabilities: nothing it runs needs more.
LEAST_PRIVILEGE = {
    "runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
PORT = 8080
# Long enough for a requirements.txt install (MD_INSTALL_TIMEOUT's default, 900 s) plus loading the model.
STARTUP_BUDGET_SECONDS = 1200
PROBE_PERIOD_SECONDS = 10
ANNOTATION = "md-base/"  # the Deployment's annotations that store the platform's values (lifecycle reads them back)


class Autoscale(NamedTuple):
    """A HorizontalPodAutoscaler on CPU within the platform's replica limits: MIN-MAX[@PERCENT]."""

    min_replicas: int
    max_replicas: int
    cpu_percent: int = 70

    @classmethod
    def parse(cls, text: str) -> "Autoscale":
        match = re.fullmatch(r"(\d+)-(\d+)(?:@(\d+))?", text.strip())
        low, high = LIMITS["replicas"][:2]
        if match is None:
            raise DeploymentError("autoscale {!r} is not MIN-MAX or MIN-MAX@PERCENT (e.g. 2-5, or 2-5@60 for a 60% "
                                  "CPU target)".format(text))
        scale = cls(int(match.group(1)), int(match.group(2)), int(match.group(3) or 70))
        if not low <= scale.min_replicas <= scale.max_replicas <= high or not 10 <= scale.cpu_percent <= 100:
            raise DeploymentError("autoscale {!r}: replicas from {} to {}, MIN <= MAX, and a CPU target of 10-100%".format(
                text, low, high))
        return scale

    def __str__(self) -> str:
        return "{}-{}@{}".format(*self)


class DeploymentParams(BaseModel):
    image_uri: str = Field(..., description="An md-base image, optionally behind a registry prefix.")
    replicas: int = Field(1, ge=LIMITS["replicas"][0], le=LIMITS["replicas"][1], description="Pods while active.")
    cpu: int = Field(100, ge=LIMITS["cpu"][0], le=LIMITS["cpu"][1], description="Millicores reserved per replica.")
    memory: int = Field(256, ge=LIMITS["memory"][0], le=LIMITS["memory"][1], description="MiB reserved per replica.")
    active: bool = Field(True, description="False scales to zero pods; the other values are kept for later.")

    @property
    def pods(self) -> int:
        return self.replicas if self.active else 0


def _field_values(params: DeploymentParams) -> Dict[str, Any]:
    return dict(params.model_dump() if hasattr(params, "model_dump") else params.dict())


def make_params(derived_image: bool = False, **fields: Any) -> DeploymentParams:
    """Validated parameters; a field not given (or None) takes the platform's default. `derived_image`: the
    image may be one of the user's own, built FROM an md-base image (a note, not an error, if it is unknown)."""
    given = {k: v for k, v in fields.items() if v is not None}
    try:
        params = DeploymentParams(**given)
    except ValidationError as exc:
        raise DeploymentError(_explain(exc, given)) from None
    if not is_md_base_image(params.image_uri):
        if not derived_image:
            raise DeploymentError(
                "image_uri {!r} is not an md-base image; choose one of {} (optionally behind a registry prefix)".format(
                    params.image_uri, ", ".join(KNOWN_IMAGES)))
        log.warning("note: %s is not one of the md-base images; it must be built FROM one of them (%s)",
                    params.image_uri, ", ".join(KNOWN_IMAGES))
    return params


def update_params(stored: DeploymentParams, derived_image: bool = False, **changes: Any) -> DeploymentParams:
    """Only the fields given change; `active=False` keeps replicas, cpu and memory for when it comes back."""
    given = {k: v for k, v in changes.items() if v is not None}
    if not given:
        raise DeploymentError("an update must change at least one of: {}".format(", ".join(_field_values(stored))))
    return make_params(derived_image=derived_image, **dict(_field_values(stored), **given))


def is_md_base_image(image_uri: str) -> bool:
    return any(image_uri == known or image_uri.endswith("/" + known) for known in KNOWN_IMAGES)


def _explain(exc: ValidationError, given: Dict[str, Any]) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0])
        if name in LIMITS:
            low, high, unit = LIMITS[name]
            problems.append("{} must be a whole number from {} to {} {} (got {!r})".format(name, low, high, unit, given.get(name)))
        elif name == "image_uri" and name not in given:
            problems.append("image_uri is required; choose one of {}".format(", ".join(KNOWN_IMAGES)))
        else:
            problems.append("{}: {} (got {!r})".format(name, error["msg"], given.get(name)))
    return "invalid deployment: " + "; ".join(problems)


# --- Kubernetes -------------------------------------------------------------------------------------------


def k8s_manifests(name: str, params: DeploymentParams, model_source: str = "pvc", model_ref: Optional[str] = None,
                  env_cache_claim: Optional[str] = None, autoscale: Optional[Autoscale] = None) -> List[Dict[str, Any]]:
    """A Deployment and a Service, and a HorizontalPodAutoscaler with `autoscale`. The model reaches the pod
    from a PersistentVolumeClaim (model_source "pvc", default claim NAME-model) or from a model image whose
    /model an init container copies ("image")."""
    if not re.match(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$", name):
        raise DeploymentError("name {!r} must be a DNS label: lowercase letters, digits and '-', at most 52".format(name))
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "model-server"}
    stored = {ANNOTATION + "replicas": str(params.replicas), ANNOTATION + "cpu": str(params.cpu),
              ANNOTATION + "memory": str(params.memory), ANNOTATION + "active": str(params.active).lower()}
    if autoscale:
        stored[ANNOTATION + "autoscale"] = str(autoscale)
    deployment: Dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "annotations": stored},
        "spec": {
            "replicas": params.pods,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}},
                "spec": _pod_spec(name, params, model_source, model_ref, env_cache_claim),
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }
    if autoscale is None:
        return [deployment, service]
    if params.active:  # the autoscaler owns the count; an apply would reset it. Scaled to zero, it pauses.
        del deployment["spec"]["replicas"]
    return [deployment, service, _autoscaler(name, labels, autoscale)]


def _autoscaler(name: str, labels: Dict[str, str], autoscale: Autoscale) -> Dict[str, Any]:
    target = {"type": "Utilization", "averageUtilization": autoscale.cpu_percent}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                 "minReplicas": autoscale.min_replicas, "maxReplicas": autoscale.max_replicas,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": target}}]},
    }


def _pod_spec(name: str, params: DeploymentParams, model_source: str, model_ref: Optional[str],
              env_cache_claim: Optional[str]) -> Dict[str, Any]:
    quantities = {"cpu": "{}m".format(params.cpu), "memory": "{}Mi".format(params.memory)}
    container = {
        "name": "model-server",
        "image": params.image_uri,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [{"name": "MD_MEMORY_MIB", "value": str(params.memory)}, {"name": "MD_LOG_FORMAT", "value": "json"}],
        # requests == limits: Guaranteed QoS, and the cgroup quota the runtime sizes workers and threads from
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True},
                         {"name": "env-cache", "mountPath": CACHE_MOUNT}, {"name": "tmp", "mountPath": TMP_MOUNT}],
        "startupProbe": _probe("/ready", failures=STARTUP_BUDGET_SECONDS // PROBE_PERIOD_SECONDS),
        "readinessProbe": _probe("/ready", failures=3),
        "livenessProbe": _probe("/health", failures=3),
        "securityContext": LEAST_PRIVILEGE,
    }
    spec: Dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": termination_grace_seconds(read_settings({})),  # the defaults
        "securityContext": {"fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [_cache_volume(env_cache_claim), {"name": "tmp", "emptyDir": {}}],
    }
    if model_source == "image":
        if not model_ref:
            raise DeploymentError("--model-image is required when the model comes from an image")
        spec["volumes"].append({"name": "model", "emptyDir": {}})
        spec["initContainers"] = [{
            "name": "model-files",
            "image": model_ref,
            "command": ["sh", "-c", "cp -R /model/. {}/".format(MODEL_MOUNT)],
            "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT}],
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": dict(quantities)},
            "securityContext": LEAST_PRIVILEGE,
        }]
    else:
        claim = model_ref or "{}-model".format(name)
        spec["volumes"].append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    return spec


def termination_grace_seconds(settings: Settings) -> int:
    """What SIGTERM takes at most: the drain (ready off, still serving while the endpoints update), then
    in-flight requests finishing, plus a margin before the kubelet's SIGKILL."""
    return math.ceil(settings.drain_seconds) + settings.graceful_timeout + 5


def _cache_volume(claim: Optional[str]) -> Dict[str, Any]:
    if claim:  # shared by the replicas: the first builds the overlay, the others wait on its lock and reuse it
        return {"name": "env-cache", "persistentVolumeClaim": {"claimName": claim}}
    return {"name": "env-cache", "emptyDir": {}}


def _probe(path: str, failures: int) -> Dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": PROBE_PERIOD_SECONDS,
            "timeoutSeconds": 5, "failureThreshold": failures}


def docker_run_line(params: DeploymentParams, model_dir: str, port: int = PORT) -> str:
    """The local equivalent of one replica."""
    cpus = "{:g}".format(params.cpu / 1000)
    return ("docker run --rm -p {port}:8080 --cpus {cpus} --memory {memory}m -e MD_MEMORY_MIB={memory} "
            "--read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges "
            "-v {model}:/app/model:ro -v md-envs:/cache {image}").format(
        port=port, cpus=cpus, memory=params.memory, model=model_dir, image=params.image_uri)


def to_yaml(documents: List[Dict[str, Any]]) -> str:
    """YAML for plain dicts, lists, strings, numbers and booleans (no PyYAML needed)."""
    return "".join("---\n" + _yaml_lines(doc, 0) for doc in documents)


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(str(value))  # JSON strings are valid YAML double-quoted scalars


def _yaml_lines(value: Any, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                out.append("{}{}:\n{}".format(pad, key, _yaml_lines(item, indent + 1)))
            else:
                out.append("{}{}: {}\n".format(pad, key, "{}" if item == {} else "[]" if item == [] else _scalar(item)))
        return "".join(out)
    out = []
    for item in value:
        text = _yaml_lines(item, indent + 1) if isinstance(item, (dict, list)) else "  " * (indent + 1) + _scalar(item) + "\n"
        out.append(pad + "- " + text[len(pad) + 2:])
    return "".join(out)

