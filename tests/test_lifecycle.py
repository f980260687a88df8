"""The platform's deployment lifecycle on rendered manifests: add, scale out, scale up memory, scale down, scale
up again, each update read back from the previous output as `kubectl get deployment -o json` gives it; and
`md-runtime deploy` through a real kubectl (Debian's kubernetes-client)."""

import json
import os
import shutil
import socket
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from support import md_runtime

ML = "md-base/python/machine-learning:1.1.0"
FAKE_KUBECTL = Path(__file__).parent / "fixtures" / "kubectl"


def rendered(*argv: str, stdin: str = None) -> list:
    """md-runtime's manifests for argv, each checked against the Kubernetes schemas (1.28 and the latest)."""
    done = md_runtime(*argv, input=stdin)
    assert done.returncode == 0, done.stderr
    manifests = list(yaml.safe_load_all(done.stdout))
    for manifest in manifests:
        kubernetes_validate.validate(manifest, "1.28.0", strict=True)
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    return manifests


def as_the_cluster_returns_it(manifests: list, tmp_path: Path, step: str) -> Path:
    """The Deployment as `kubectl get deployment NAME -o json` prints it: the server's fields added."""
    deployment = json.loads(json.dumps(next(m for m in manifests if m["kind"] == "Deployment")))
    deployment["metadata"].update(uid="4c1d", resourceVersion="1871", generation=3, creationTimestamp="2026-12-06T10:00:00Z")
    deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"
    deployment["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = json.dumps(deployment)
    deployment["status"] = {"replicas": deployment["spec"].get("replicas", 1), "readyReplicas": 1, "observedGeneration": 3}
    path = tmp_path / "{}.json".format(step)
    path.write_text(json.dumps(deployment, indent=2))
    return path


def stored(manifests: list) -> dict:
    deployment = next(m for m in manifests if m["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {
        "annotations": {k.split("/")[1]: v for k, v in deployment["metadata"]["annotations"].items()},
        "pods": deployment["spec"].get("replicas"),
        "resources": container["resources"]["limits"],
        "image": container["image"],
        "model": deployment["spec"]["template"]["spec"]["initContainers"][0]["image"],
        "cache": deployment["spec"]["template"]["spec"]["volumes"][0],
        "autoscaler": next((m["spec"] for m in manifests if m["kind"] == "HorizontalPodAutoscaler"), None),
    }


def test_each_update_changes_only_what_it_is_given_and_scale_up_restores_what_scale_down_kept(tmp_path):
    first = rendered("k8s", "iris", "--image", ML, "--cpu", "250", "--memory", "512", "--replicas", "2",
                     "--model-image", "registry.example.com/iris-model:3", "--env-cache-pvc", "md-envs")
    out = rendered("k8s", "iris", "--from", str(as_the_cluster_returns_it(first, tmp_path, "added")), "--replicas", "4")
    assert stored(out)["annotations"] == {"replicas": "4", "cpu": "250", "memory": "512", "active": "true"}
    assert stored(out)["pods"] == 4

    out = rendered("k8s", "iris", "--from", str(as_the_cluster_returns_it(out, tmp_path, "scaled-out")), "--memory", "1024")
    assert stored(out)["annotations"] == {"replicas": "4", "cpu": "250", "memory": "1024", "active": "true"}
    kept = stored(out)

    down = rendered("k8s", "iris", "--from", str(as_the_cluster_returns_it(out, tmp_path, "bigger")), "--inactive")
    assert stored(down)["pods"] == 0
    assert stored(down)["annotations"] == dict(kept["annotations"], active="false")
    assert {k: v for k, v in stored(down).items() if k not in ("pods", "annotations")} == \
        {k: v for k, v in kept.items() if k not in ("pods", "annotations")}

    yaml_of_down = md_runtime("k8s", "iris", "--from", str(as_the_cluster_returns_it(down, tmp_path, "down")), "--inactive").stdout
    up = rendered("k8s", "iris", "--from", "-", "--active", stdin=yaml_of_down)  # md-runtime's own YAML, on stdin
    assert stored(up) == kept, "scaling up restores exactly what scaling down kept"
    assert stored(up)["resources"] == {"cpu": "250m", "memory": "1024Mi"}


def test_an_autoscaler_owns_the_replica_count_pauses_when_scaled_down_and_can_be_removed(tmp_path):
    out = rendered("k8s", "iris", "--image", ML, "--replicas", "2", "--model-image", "m:1", "--autoscale", "2-6@60")
    assert stored(out)["autoscaler"]["minReplicas"] == 2 and stored(out)["autoscaler"]["maxReplicas"] == 6
    assert stored(out)["autoscaler"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert stored(out)["pods"] is None, "no replica count for an apply to reset under the autoscaler"

    down = rendered("k8s", "iris", "--from", str(as_the_cluster_returns_it(out, tmp_path, "a")), "--inactive")
    assert stored(down)["pods"] == 0 and stored(down)["autoscaler"] == stored(out)["autoscaler"]
    up = rendered("k8s", "iris", "--from", str(as_the_cluster_returns_it(down, tmp_path, "b")), "--active")
    assert stored(up)["pods"] is None and stored(up)["autoscaler"] == stored(out)["autoscaler"]

    fixed = rendered("k8s", "iris", "--from", str(as_the_cluster_returns_it(up, tmp_path, "c")), "--no-autoscale")
    assert stored(fixed)["autoscaler"] is None and stored(fixed)["pods"] == 2
    assert "autoscale" not in stored(fixed)["annotations"]


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "11"], "invalid deployment: replicas must be a whole number from 1 to 10 replicas (got 11)"),
    (["--autoscale", "0-20"], "autoscale '0-20': replicas from 1 to 10, MIN <= MAX"),
    (["--autoscale", "lots"], "autoscale 'lots' is not MIN-MAX or MIN-MAX@PERCENT"),
])
def test_an_update_outside_the_platforms_limits_is_refused_with_them(tmp_path, argv, message):
    current = as_the_cluster_returns_it(rendered("k8s", "iris", "--image", ML, "--model-image", "m:1"), tmp_path, "x")
    done = md_runtime("k8s", "iris", "--from", str(current), *argv)
    assert done.returncode == 2
    assert message in done.stderr.strip().splitlines()[-1]


def test_a_file_without_the_deployment_or_not_rendered_by_md_runtime_is_named(tmp_path):
    current = as_the_cluster_returns_it(rendered("k8s", "iris", "--image", ML, "--model-image", "m:1"), tmp_path, "x")
    done = md_runtime("k8s", "wine", "--from", str(current))
    assert done.stderr.strip().splitlines()[-1] == "md-runtime: error: {} holds no Deployment named 'wine' (it has iris)".format(current)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "iris"},
                                     "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}))
    done = md_runtime("k8s", "iris", "--from", str(other))
    assert "is not a Deployment md-runtime rendered" in done.stderr.strip().splitlines()[-1]
    done = md_runtime("k8s", "iris")
    assert done.returncode == 2 and "--image is required for a first deployment" in done.stderr
    edited = json.loads(current.read_text())
    edited["metadata"]["annotations"]["md-base/memory"] = "lots"
    current.write_text(json.dumps(edited))
    done = md_runtime("k8s", "iris", "--from", str(current), "--replicas", "2")
    assert done.stderr.strip().splitlines()[-1] == ("md-runtime: error: {}'s stored values: invalid deployment: memory "
                                                    "must be a whole number from 150 to 16384 MiB (got 'lots')".format(current))


# --- deploy, through a real kubectl -------------------------------------------------------------------------


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch) -> str:
    """A kubeconfig whose current context, `ci-cluster`, points at a port nothing listens on."""
    if shutil.which("kubectl") is None:  # tests/run.sh installs it on the host (.ci/kubectl); the images have none
        pytest.skip("kubectl is not installed: `bash .ci/kubectl` installs Debian's kubernetes-client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "ci-cluster",
              "clusters": [{"name": "ci", "cluster": {"server": "https://127.0.0.1:{}".format(port)}}],
              "users": [{"name": "ci", "user": {"token": "not-a-token"}}],
              "contexts": [{"name": "ci-cluster", "context": {"cluster": "ci", "user": "ci"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return "ci-cluster"


def test_deploy_with_no_cluster_reachable_names_the_context_in_one_line(kubeconfig):
    done = md_runtime("deploy", "iris", "--image", ML)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("md-runtime: error: cannot reach the cluster of kubeconfig context 'ci-cluster': "), last
    assert "refused" in last, last


def test_deploy_dry_run_prints_what_changes_and_the_manifests_and_applies_nothing(kubeconfig, tmp_path):
    current = as_the_cluster_returns_it(rendered("k8s", "iris", "--image", ML, "--cpu", "250", "--model-image", "m:1"),
                                        tmp_path, "live")
    done = md_runtime("deploy", "iris", "--from", str(current), "--cpu", "500", "--inactive", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "---> cpu: 250 -> 500" in lines and "---> active: true -> false" in lines and "---> memory: 256" in lines
    assert lines[-1] == "---> dry run: nothing applied to kubeconfig context 'ci-cluster'"
    deployment = next(m for m in yaml.safe_load_all(done.stdout) if m["kind"] == "Deployment")
    kubernetes_validate.validate(deployment, "1.28.0", strict=True)
    assert deployment["spec"]["replicas"] == 0 and deployment["metadata"]["annotations"]["md-base/cpu"] == "500"


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch) -> Path:
    """tests/fixtures/kubectl first on PATH: a stand-in for a cluster (there is none on these machines)."""
    state = tmp_path / "cluster"
    state.mkdir()
    monkeypatch.setenv("PATH", "{}:{}".format(FAKE_KUBECTL, os.environ["PATH"]))
    monkeypatch.setenv("FAKE_CLUSTER", str(state))
    return state


def test_deploy_applies_then_reports_each_replica_until_the_rollout_is_ready(fake_cluster, monkeypatch):
    monkeypatch.setenv("FAKE_ROLLOUT", "ok")
    done = md_runtime("deploy", "iris", "--image", ML, "--replicas", "2", "--model-image", "m:1", "--context", "prod")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "---> replicas: 2 (new)" in lines and "---> service/iris created" in lines
    assert [line for line in lines if "replica(s) ready," in line] == [
        "---> 0/2 replica(s) ready, 2 of the new revision", "---> 1/2 replica(s) ready, 2 of the new revision",
        "---> 2/2 replica(s) ready, 2 of the new revision"]
    assert lines[-1] == "---> iris: 2 replica(s) ready"
    calls = (fake_cluster / "calls").read_text().splitlines()
    assert calls[:2] == ["get deployment iris --output json --request-timeout 20s", "apply --filename -"]


def test_a_rollout_that_does_not_finish_ends_with_the_pods_reason_and_the_runtimes_error(fake_cluster, monkeypatch):
    monkeypatch.setenv("FAKE_ROLLOUT", "oom")
    done = md_runtime("deploy", "iris", "--image", ML, "--model-image", "m:1", "--timeout", "0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "md-runtime: error: the rollout of iris did not finish in 0 s: pod iris-7d9f-abcde: OOMKilled (md-runtime: error: "
        "ModelServeError: the model does not fit: loading the model took more than 460 MiB)")
