"""Deployment parameters, the Kubernetes manifests and docker run line they render, and the memory guard."""

import configparser
import copy

import kubernetes_validate
import pytest
import yaml

from md_runtime.deployment import KNOWN_IMAGES, docker_run_line, k8s_manifests, make_params, to_yaml, update_params
from md_runtime.errors import DeploymentError
from md_runtime.boot.resources import memory_limit_mib
from support import REPO, md_runtime

ML = "md-base/python/machine-learning:1.1.0"
def test_known_images_are_the_images_we_build():
    ini = configparser.ConfigParser()
    ini.read(str(REPO / "dockerfiles" / "images.ini"))
    built = sorted("md-base/python/{}:{}".format(name, ini[name]["version"]) for name in ini.sections())
    assert sorted(KNOWN_IMAGES) == built


def test_fields_not_given_take_the_platform_defaults():
    params = make_params(image_uri=ML)
    assert (params.replicas, params.cpu, params.memory, params.active, params.pods) == (1, 100, 256, True, 1)
    assert make_params(image_uri="registry.example.com/team/" + ML).image_uri.endswith(ML)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(image_uri="python:3.9"), "image_uri 'python:3.9' is not an md-base image; choose one of md-base/python/machine-learning:1.1.0"),
        (dict(), "image_uri is required; choose one of"),
        (dict(image_uri=ML, replicas=11), "replicas must be a whole number from 1 to 10 replicas (got 11)"),
        (dict(image_uri=ML, cpu=5), "cpu must be a whole number from 10 to 4000 millicores (got 5)"),
        (dict(image_uri=ML, memory=100000), "memory must be a whole number from 150 to 16384 MiB (got 100000)"),
        (dict(image_uri=ML, memory="lots"), "memory must be a whole number from 150 to 16384 MiB (got 'lots')"),
    ],
)
def test_out_of_range_fields_are_named_with_their_limits(fields, message):
    with pytest.raises(DeploymentError) as caught:
        make_params(**fields)
    assert message in caught.value.message


def test_an_update_changes_only_the_fields_given_and_inactive_keeps_them():
    stored = make_params(image_uri=ML, replicas=3, cpu=500, memory=1024)
    paused = update_params(stored, active=False)
    assert (paused.pods, paused.replicas, paused.cpu, paused.memory) == (0, 3, 500, 1024)
    back = update_params(paused, active=True)
    assert (back.pods, back.cpu, back.memory) == (3, 500, 1024)
    assert update_params(stored, cpu=250).memory == 1024
    with pytest.raises(DeploymentError, match="an update must change at least one of"):
        update_params(stored)


PARAMETER_SETS = [
    dict(image_uri=ML),
    dict(image_uri="md-base/python/python-39:1.1.0", cpu=250, memory=512, replicas=2),
    dict(image_uri="md-base/python/deep-learning:1.2.0", cpu=4000, memory=16384, replicas=10, active=False),
]


@pytest.mark.parametrize("fields", PARAMETER_SETS)
@pytest.mark.parametrize("model_flags", [[], ["--model-image", "registry.example.com/iris-model:3", "--env-cache-pvc", "md-envs"]])
def test_k8s_manifests_validate_and_carry_the_values_asked_for(fields, model_flags):
    argv = ["k8s", "iris", "--image", fields["image_uri"]]
    for name in ("cpu", "memory", "replicas"):
        if name in fields:
            argv += ["--" + name, str(fields[name])]
    argv += ["--inactive"] if fields.get("active") is False else []
    result = md_runtime(*argv, *model_flags)
    assert result.returncode == 0, result.stderr
    deployment, service = list(yaml.safe_load_all(result.stdout))
    for resource in (deployment, service):
        kubernetes_validate.validate(resource, "1.28.0", strict=True)
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)

    params = make_params(**fields)
    assert deployment["spec"]["replicas"] == params.pods
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    expected = {"cpu": "{}m".format(params.cpu), "memory": "{}Mi".format(params.memory)}
    assert container["resources"] == {"requests": expected, "limits": expected}
    assert container["image"] == params.image_uri
    assert {"name": "MD_MEMORY_MIB", "value": str(params.memory)} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900, "a requirements install must fit"
    assert deployment["metadata"]["annotations"]["md-base/replicas"] == str(params.replicas)
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/app/model", "/cache", "/tmp"}, "with a read-only root, /cache and /tmp are all it writes"
    pod = deployment["spec"]["template"]["spec"]
    for each in pod["containers"] + pod.get("initContainers", []):
        assert each["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_the_validator_does_reject_a_broken_manifest():
    deployment = k8s_manifests("iris", make_params(image_uri=ML))[0]
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.28.0", strict=True)
    assert yaml.safe_load(to_yaml([deployment])) == deployment


def test_k8s_rejects_a_name_kubernetes_would():
    result = md_runtime("k8s", "Iris_Model", "--image", ML)
    assert result.returncode == 2
    assert "name 'Iris_Model' must be a DNS label" in result.stderr.strip().splitlines()[-1]


def test_docker_run_line_matches_the_deployment():
    line = docker_run_line(make_params(image_uri=ML, cpu=250, memory=512), "/srv/iris")
    assert line == ("docker run --rm -p 8080:8080 --cpus 0.25 --memory 512m -e MD_MEMORY_MIB=512 "
                    "--read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges "
                    "-v /srv/iris:/app/model:ro -v md-envs:/cache " + ML)
    result = md_runtime("docker-run", "--image", ML, "--cpu", "5000")
    assert result.returncode == 2 and "cpu must be a whole number from 10 to 4000" in result.stderr


def test_docker_run_mounts_the_model_by_absolute_path_and_refuses_a_missing_one(iris_model_dir):
    relative = md_runtime("docker-run", "--image", ML, iris_model_dir.name, cwd=iris_model_dir.parent)
    assert relative.returncode == 0, relative.stderr
    assert "-v {}:/app/model:ro".format(iris_model_dir) in relative.stdout
    missing = md_runtime("docker-run", "--image", ML, "no_such_model", cwd=iris_model_dir.parent)
    assert missing.returncode == 2 and "no_such_model is not a model directory (no package.py there)" in missing.stderr


def test_k8s_and_docker_run_take_an_image_built_from_an_md_base_image():
    derived = "registry.example.com/team/iris-model:3"
    for command in (["k8s", "iris"], ["docker-run"]):
        result = md_runtime(*command, "--image", derived)
        assert result.returncode == 0, result.stderr
        assert derived in result.stdout and "must be built FROM one of them" in result.stderr


def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_memory_limit_from_cgroup_v2_and_v1(tmp_path):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    write(v2, "proc/self/cgroup", "0::/pod\n")
    write(v2, "sys/fs/cgroup/pod/memory.max", str(512 * 2 ** 20))
    assert memory_limit_mib(v2) == 512
    write(v2, "sys/fs/cgroup/pod/memory.max", "max")
    assert memory_limit_mib(v2) is None
    write(v1, "proc/self/cgroup", "5:memory:/docker/abc\n")
    write(v1, "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", str(256 * 2 ** 20))
    assert memory_limit_mib(v1) == 256
    write(v1, "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712")
    assert memory_limit_mib(v1) is None


def test_pods_get_the_time_sigterm_takes_before_they_are_killed():
    from md_runtime.settings import read_settings

    defaults = read_settings({})
    pod = k8s_manifests("iris", make_params(image_uri=ML))[0]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > defaults.drain_seconds + defaults.graceful_timeout
