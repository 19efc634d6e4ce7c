"""helm/vllm-aimer rendered with Helm's own engine (helm-python-sdk, no helm
binary, no cluster), checked object by object, against the Kubernetes API
schemas (kubernetes-validate) and against vLLM's `vllm serve` argument parser."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from tests.deploy.helm import (
    NAMESPACE, RELEASE, arg_value, by_kind, chart, notes, one, render, server_container,
)
from tests.deploy.paths import CHART_DIR

helm_python = pytest.importorskip("helm_python")

FULLNAME = f"{RELEASE}-vllm-aimer"
PLAN_DIR = "/etc/vllm-aimer/plan"
# Kubernetes versions whose API schemas every rendered object must satisfy:
# the oldest the chart declares support for and the newest kubernetes-validate ships.
KUBE_VERSIONS = ("1.25", kubernetes_validate.latest_version())
# Custom resources kubernetes-validate has no schema for; checked structurally instead.
CRD_KINDS = {"ServiceMonitor"}

# name -> (values, the --model-loader-extra-config the server must get, or None
# when pruning is off). The value sets the issue asks for, and a few more.
VALUE_SETS = {
    "defaults": ({}, {"prune_ratio": 0.5}),
    "ratio-0.25": ({"pruning": {"ratio": 0.25}}, {"prune_ratio": 0.25}),
    "ratio-0": ({"pruning": {"ratio": 0}}, {"prune_ratio": 0}),
    "plan-configmap": (
        {"pruning": {"planConfigMap": {"name": "qwen3-plan", "key": "pruned_experts.json"}}},
        {"plan": f"{PLAN_DIR}/pruned_experts.json"}),
    "plan-configmap-and-plan-out": (
        {"pruning": {"planConfigMap": {"name": "qwen3-plan", "key": "plan-v2.json"},
                     "planOut": "/var/lib/vllm-aimer/plan-out",
                     "loaderOptions": {"enable_multithread_load": True, "num_threads": 8}}},
        {"plan": f"{PLAN_DIR}/plan-v2.json", "plan_out": "/var/lib/vllm-aimer/plan-out",
         "enable_multithread_load": True, "num_threads": 8}),
    "monitoring-pdb-hpa": (
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}},
         "podDisruptionBudget": {"enabled": True},
         "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}},
        {"prune_ratio": 0.5}),
    "pvc-create": (
        {"model": {"pvc": {"create": True, "size": "120Gi", "storageClass": "fast-ssd"},
                   "path": "Qwen3-30B-A3B"},
         "pruning": {"ratio": 0.25}},
        {"prune_ratio": 0.25}),
    "pvc-existing-tp2": (
        {"model": {"pvc": {"existingClaim": "models"}, "path": "Mixtral-8x7B-Instruct-v0.1"},
         "servedModelName": "mixtral", "tensorParallelSize": 2, "gpu": {"count": 2},
         "maxModelLen": 131072, "gpuMemoryUtilization": 0.92,
         "extraArgs": ["--enable-prefix-caching", "--max-num-seqs", 64],
         "pruning": {"ratio": 0.125, "planOut": "/cache/plan"},
         "podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"}},
        {"prune_ratio": 0.125, "plan_out": "/cache/plan"}),
    "hub-id-with-secret": (
        {"model": {"id": "allenai/OLMoE-1B-7B-0924", "revision": "main",
                   "hfTokenSecret": {"name": "hf-token", "key": "HF_TOKEN"}},
         "servedModelName": "olmoe"},
        {"prune_ratio": 0.5}),
    "pruning-disabled": ({"pruning": {"enabled": False}}, None),
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request):
    values, expected_extra = VALUE_SETS[request.param]
    return request.param, copy.deepcopy(values), render(copy.deepcopy(values)), expected_extra


# --------------------------------------------------------------------------- chart basics

def test_chart_metadata():
    meta = chart().metadata
    assert meta["name"] == "vllm-aimer"
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == "v0.32.0"
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert chart().schema == schema


def test_helm_lint_is_clean():
    report = helm_python.lint(CHART_DIR, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, report


def test_defaults_validate_against_schema():
    chart().validate_schema({})
    chart().validate_schema(yaml.safe_load((CHART_DIR / "values.yaml").read_text()))


# --------------------------------------------------------------------------- every value set

def test_objects_validate_against_kubernetes_schemas(rendered):
    name, _, objects, _ = rendered
    assert objects, name
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{name}: {obj['kind']} invalid for Kubernetes {version}: "
                            f"{path}: {e.message}")


def test_standard_labels(rendered):
    _, _, objects, _ = rendered
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "vllm-aimer"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "v0.32.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "vllm-aimer-0.1.0"


def test_server_args(rendered, vllm_serve_parse):
    name, values, objects, expected_extra = rendered
    container = server_container(objects)
    assert container["command"] == ["vllm", "serve"]
    argv = container["command"][1:] + container["args"]
    assert all(isinstance(a, str) for a in argv), "every argv word must be a string"
    args = vllm_serve_parse(argv)
    assert args.host == "0.0.0.0"
    assert args.port == 8000
    if expected_extra is None:
        assert "--load-format" not in container["args"]
        return
    # The flags as the pod gets them, and as vLLM reads them.
    assert arg_value(container["args"], "--load-format") == "aimer"
    raw = arg_value(container["args"], "--model-loader-extra-config")
    assert json.loads(raw) == expected_extra
    assert args.load_format == "aimer"
    assert args.model_loader_extra_config == expected_extra
    # ...and the plugin's own option parser accepts them.
    from vllm_aimer.options import parse_options

    options = parse_options(raw)
    assert options.prune_ratio == expected_extra.get("prune_ratio")
    assert options.plan == expected_extra.get("plan")
    assert options.plan_out == expected_extra.get("plan_out")


def test_model_source(rendered, vllm_serve_parse):
    name, values, objects, _ = rendered
    container = server_container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    args = vllm_serve_parse(["serve", *container["args"]])
    model = values.get("model", {})
    pvc = model.get("pvc", {})
    claim = pvc.get("existingClaim") or (f"{FULLNAME}-models" if pvc.get("create") else None)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    # The server always reads a local directory, never the hub.
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert "HF_TOKEN" not in env, "only the download needs the token"
    assert "--revision" not in container["args"]
    if claim:
        assert args.model_tag == f"/models/{model['path']}"
        assert volumes["model"]["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
        assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}
        assert "initContainers" not in pod
        assert args.served_model_name == ([values["servedModelName"]]
                                          if values.get("servedModelName") else None)
        return
    # Hub model: the init container downloads it onto the cache volume first.
    model_id = model.get("id", "Qwen/Qwen3-30B-A3B")
    assert args.model_tag == f"/cache/models/{model_id}"
    assert args.served_model_name == [values.get("servedModelName") or model_id]
    assert "model" not in volumes
    [init] = pod["initContainers"]
    assert init["name"] == "download-model"
    assert init["image"] == container["image"]
    assert init["securityContext"] == container["securityContext"]
    assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]} == {
        "/cache": "cache", "/tmp": "tmp"}
    init_env = {e["name"]: e for e in init["env"]}
    assert init_env["MODEL_ID"]["value"] == model_id
    assert init_env["MODEL_REVISION"]["value"] == model.get("revision", "")
    assert init_env["MODEL_DIR"]["value"] == args.model_tag
    assert "*.bin" in json.loads(init_env["IGNORE_PATTERNS"]["value"])
    secret = model.get("hfTokenSecret", {}).get("name")
    if secret:
        assert init_env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": secret, "key": model["hfTokenSecret"]["key"]}}}
    else:
        assert "HF_TOKEN" not in init_env


FAKE_HUB = """
import json, os, pathlib

def snapshot_download(repo_id, revision, local_dir, ignore_patterns):
    pathlib.Path(local_dir).mkdir(parents=True, exist_ok=True)
    with open(os.environ["CALLS"], "a") as log:
        log.write(json.dumps([repo_id, revision, str(local_dir), ignore_patterns]) + "\\n")
    return str(local_dir)
"""


def test_download_script(tmp_path):
    """The init container's script, run against a stand-in huggingface_hub: it
    downloads once into MODEL_DIR with the ignore patterns, then skips."""
    objects = render({"model": {"id": "org/Some-MoE", "revision": "v1"}})
    [init] = one(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][:2] == ["python3", "-c"]
    script = init["command"][2]
    fake = tmp_path / "fake"
    (fake / "huggingface_hub").mkdir(parents=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(FAKE_HUB)
    env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
    model_dir = tmp_path / "cache" / "models" / "org" / "Some-MoE"
    env.update(MODEL_DIR=str(model_dir), PYTHONPATH=str(fake), CALLS=str(tmp_path / "calls"),
               PATH="/usr/bin:/bin")
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    assert calls == [["org/Some-MoE", "v1", str(model_dir),
                      json.loads(env["IGNORE_PATTERNS"])]], "second start must not download"
    assert "already in" in result.stdout
    # The real function takes the same keywords.
    import inspect

    import huggingface_hub

    params = inspect.signature(huggingface_hub.snapshot_download).parameters
    assert {"repo_id", "revision", "local_dir", "ignore_patterns"} <= set(params)


def test_plan_volume(rendered):
    _, values, objects, expected_extra = rendered
    container = server_container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    cm = values.get("pruning", {}).get("planConfigMap")
    if cm:
        assert volumes["plan"]["configMap"] == {
            "name": cm["name"], "items": [{"key": cm["key"], "path": cm["key"]}]}
        assert mounts["plan"] == {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True}
        assert expected_extra["plan"] == f"{mounts['plan']['mountPath']}/{cm['key']}"
    else:
        assert "plan" not in volumes and "plan" not in mounts
    plan_out = values.get("pruning", {}).get("planOut")
    if plan_out:
        assert volumes["plan-out"] == {"name": "plan-out", "emptyDir": {}}
        assert mounts["plan-out"]["mountPath"] == plan_out
    else:
        assert "plan-out" not in volumes


def test_gpus_and_parallelism(rendered, vllm_serve_parse):
    _, values, objects, _ = rendered
    container = server_container(objects)
    gpus = values.get("gpu", {}).get("count", 1)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    args = vllm_serve_parse(["serve", *container["args"]])
    assert args.tensor_parallel_size == values.get("tensorParallelSize", 1)
    assert args.max_model_len == values.get("maxModelLen")
    if "gpuMemoryUtilization" in values:
        assert args.gpu_memory_utilization == values["gpuMemoryUtilization"]
    else:
        assert "--gpu-memory-utilization" not in container["args"]
    for extra in values.get("extraArgs", []):
        assert str(extra) in container["args"]


def test_probes(rendered):
    _, _, objects, _ = rendered
    container = server_container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 3600, \
        "big MoE checkpoints need up to an hour to load"
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    # vLLM's API server waits as long for the engine as Kubernetes waits for the pod.
    env = {e["name"]: e.get("value") for e in container["env"]}
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert env["VLLM_ENGINE_READY_TIMEOUT_S"] == str(budget)


def test_engine_ready_timeout_follows_the_startup_probe_or_env():
    container = server_container(render({"startupProbe": {
        "httpGet": {"path": "/health", "port": "http"}, "initialDelaySeconds": 30,
        "periodSeconds": 20, "failureThreshold": 90}}))
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VLLM_ENGINE_READY_TIMEOUT_S"] == "1830"
    container = server_container(render({"env": [
        {"name": "VLLM_ENGINE_READY_TIMEOUT_S", "value": "7200"}]}))
    values = [e.get("value") for e in container["env"] if e["name"] == "VLLM_ENGINE_READY_TIMEOUT_S"]
    assert values == ["7200"]


def test_security_context_and_writable_volumes(rendered):
    _, _, objects, _ = rendered
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 1000
    assert psc["fsGroup"] == 1000
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/cache"] == "cache" and "emptyDir" in volumes["cache"]
    assert mounts["/tmp"] == "tmp" and "emptyDir" in volumes["tmp"]
    assert mounts["/dev/shm"] == "dshm"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == "/cache"
    for var in ("HF_HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
        assert env[var].startswith("/cache/")


def test_service(rendered):
    _, _, objects, _ = rendered
    service = one(objects, "Service")
    assert service["metadata"]["name"] == FULLNAME
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --------------------------------------------------------------------------- optional objects

def test_optional_objects_off_by_default():
    kinds = sorted(o["kind"] for o in render({}))
    assert kinds == ["Deployment", "Service"]
    assert one(render({}), "Deployment")["spec"]["replicas"] == 1


def test_service_monitor_pdb_hpa():
    values, _ = VALUE_SETS["monitoring-pdb-hpa"]
    objects = render(copy.deepcopy(values))
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    selector = deployment["spec"]["selector"]["matchLabels"]

    sm = one(objects, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"].items() <= \
        one(objects, "Service")["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s"

    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector

    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    assert hpa["spec"]["metrics"]


def test_pdb_max_unavailable():
    values, _ = VALUE_SETS["pvc-existing-tp2"]
    pdb = one(render(copy.deepcopy(values)), "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": "50%",
                           "selector": pdb["spec"]["selector"]}


def test_pvc_create():
    values, _ = VALUE_SETS["pvc-create"]
    objects = render(copy.deepcopy(values))
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == f"{FULLNAME}-models"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-ssd",
                           "resources": {"requests": {"storage": "120Gi"}}}
    no_class = render({"model": {"pvc": {"create": True, "storageClass": "-"}}})
    assert one(no_class, "PersistentVolumeClaim")["spec"]["storageClassName"] == ""
    default_class = render({"model": {"pvc": {"create": True}}})
    assert "storageClassName" not in one(default_class, "PersistentVolumeClaim")["spec"]
    # An existing claim wins; nothing is created.
    existing = render({"model": {"pvc": {"create": True, "existingClaim": "models"}}})
    assert not by_kind(existing, "PersistentVolumeClaim")


def test_notes():
    text = notes({})
    assert f"kubectl -n {NAMESPACE} port-forward service/{FULLNAME} 8000:8000" in text
    assert "curl -s http://127.0.0.1:8000/v1/models" in text
    assert "curl -s http://127.0.0.1:8000/metrics | grep vllm_aimer" in text
    assert '{"prune_ratio":0.5}' in text
    plan = notes({"pruning": {"planConfigMap": {"name": "p"}, "planOut": "/cache/out"}})
    assert f'"plan":"{PLAN_DIR}/pruned_experts.json"' in plan
    assert "kubectl -n llm cp" in plan


# --------------------------------------------------------------------------- rejected values

BAD_VALUES = {
    "ratio 1.0": {"pruning": {"ratio": 1.0}},
    "ratio -0.1": {"pruning": {"ratio": -0.1}},
    "ratio as a string": {"pruning": {"ratio": "0.5"}},
    "ratio and planConfigMap": {"pruning": {"ratio": 0.5, "planConfigMap": {"name": "p"}}},
    "unknown pruning key": {"pruning": {"ratoi": 0.5}},
    "unknown top-level key": {"pruneRatio": 0.5},
    "negative GPU count": {"gpu": {"count": -1}},
    "fractional GPU count": {"gpu": {"count": 0.5}},
    "tensorParallelSize 0": {"tensorParallelSize": 0},
    "maxModelLen as text": {"maxModelLen": "32k"},
    "gpuMemoryUtilization above 1": {"gpuMemoryUtilization": 1.5},
    "plan key with a slash": {"pruning": {"planConfigMap": {"name": "p", "key": "a/b.json"}}},
    "relative planOut": {"pruning": {"planOut": "plan-out"}},
    "planOut over the cache": {"pruning": {"planOut": "/cache"}},
    "loaderOptions overriding the ratio": {"pruning": {"loaderOptions": {"prune_ratio": 0.9}}},
    "empty image tag": {"image": {"tag": ""}},
    "bad claim name": {"model": {"pvc": {"existingClaim": "My_Models"}}},
    "HF token value instead of a secret": {"model": {"hfTokenSecret": {"token": "hf_abc"}}},
    "bad service port": {"service": {"port": 70000}},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects(values):
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


@pytest.mark.parametrize(("values", "message"), [
    ({"tensorParallelSize": 4, "gpu": {"count": 2}}, "tensorParallelSize (4)"),
    ({"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}, "minReplicas"),
    ({"model": {"id": ""}}, "set model.id"),
], ids=["tp-above-gpus", "hpa-min-above-max", "no-model"])
def test_template_rejects(values, message):
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render(values)


def test_ratio_null_with_plan_is_accepted():
    """`--set pruning.ratio=null` next to a plan is the documented way to switch."""
    objects = render({"pruning": {"ratio": None, "planConfigMap": {"name": "p"}}})
    args = server_container(objects)["args"]
    assert json.loads(arg_value(args, "--model-loader-extra-config")) == {
        "plan": f"{PLAN_DIR}/pruned_experts.json"}
