"""The Helm chart: lint, render every values file, validate each object strictly, check the contract with the CLI."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import CHART, EXAMPLES, NAMESPACE, RELEASE, REPO, pod_templates, run_helm
from manifest_validation import validate

from control_plane.config import ControlPlaneConfig
from control_plane.spec import DeploymentSpec

VALUES_FILES = {
    "default": None,
    "cpu-dev": EXAMPLES / "cpu-dev.yaml",
    "h100-pd": EXAMPLES / "h100-pd.yaml",
    "multitenant-lora": EXAMPLES / "multitenant-lora.yaml",
}
FULLNAME = f"{RELEASE}-raylane"
BAD_VALUES = Path(__file__).with_name("bad-values.yaml")


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objects}


def _secret_names(objects: list[dict[str, Any]]) -> set[str]:
    return {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the chart renders, keyed by a readable name."""
    return {name: template["spec"] for name, template in pod_templates(objects).items()}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --- lint and render --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUES_FILES)
def test_helm_lint(helm, name):
    values = VALUES_FILES[name]
    result = run_helm(helm, "lint", str(CHART), *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[ERROR]" not in result.stdout


@pytest.mark.parametrize("name", VALUES_FILES)
def test_every_rendered_object_is_valid(render, name):
    objects = render(VALUES_FILES[name])
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "NetworkPolicy"} <= kinds(objects)
    errors = {f"{o['kind']}/{o['metadata']['name']}": validate(o) for o in objects}
    assert not {k: v for k, v in errors.items() if v}, json.dumps(errors, indent=2)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects share a kind and name"


def test_validator_rejects_unknown_fields_and_bad_types(render):
    """The strict validators really are strict, for core kinds and for the RayCluster alike."""
    objects = render()
    router = json.loads(json.dumps(find(objects, "Deployment", f"{FULLNAME}-router")))
    router["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {"port": 1}
    router["spec"]["replicas"] = "two"
    errors = validate(router)
    assert any("grpcc: unknown field" in e for e in errors), errors
    assert any("spec.replicas: must be int" in e for e in errors), errors

    cluster = json.loads(json.dumps(find(objects, "RayCluster")))
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    errors = "\n".join(validate(cluster))
    assert "rayStartParams.num-cpus: 0 is not of type 'string'" in errors
    assert "'maxReplica' was unexpected" in errors
    assert "volumeMount: unknown field of V1Container" in errors


# --- values schema ------------------------------------------------------------------------------------------------


def test_bad_values_fail_schema_validation_with_readable_errors(helm):
    result = run_helm(helm, "lint", str(CHART), "-f", str(BAD_VALUES))
    assert result.returncode != 0
    out = result.stdout + result.stderr
    for expected in (
        "/router/port",
        "65,535",
        "/deployments/0/pools/0/role",
        "value must be one of 'prefill', 'decode', 'mixed'",
        "/deployments/0/name",
        "/ray/workerGroups/0/rayStartParams/num-gpus': got number, want string",
        "additional properties 'routerPort' not allowed",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"


@pytest.mark.parametrize(
    ("set_args", "message"),
    [
        (["router.http.port=50051"], "router.http.port: the HTTP API needs its own port"),
        (["redis.enabled=false"], "set redis.enabled=true (the bundled StatefulSet) or externalRedis.url"),
        (
            ["deployments[0].name=a", "deployments[0].model=/m", "deployments[0].pools[0].role=prefill"],
            "deployments[0].pools: 'prefill' and 'decode' pools come in pairs",
        ),
        (
            [f"ray.workerGroups[0].{k}" for k in ("name=cpu", "replicas=1", "minReplicas=3", "maxReplicas=4")],
            "ray.workerGroups[0] (cpu): need minReplicas <= replicas <= maxReplicas, got 3 <= 1 <= 4",
        ),
        (["modelStorage.enabled=true"], "modelStorage.existingClaim: name the PVC"),
        (
            ["router.http.enabled=false", "router.metricsPort=50051"],
            "router.metricsPort: 50051 is taken on the router pods",
        ),
        (["controlPlane.metricsPort=8265"], "controlPlane.metricsPort: 8265 is taken on the head pod"),
    ],
)
def test_values_the_schema_cannot_express_fail_with_a_clear_message(helm, chart_copy, set_args, message):
    args = ["template", RELEASE, str(chart_copy)]
    for item in set_args:
        args += ["--set", item]
    result = run_helm(helm, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_values_defaults_hold_no_secret():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["apiKey"] == {"tenant": "default", "existingSecret": "", "secretKey": "api-key", "generate": False}
    assert values["redis"]["auth"]["existingSecret"] == ""
    assert values["externalRedis"]["url"] == ""
    text = (CHART / "values.yaml").read_text().lower()
    assert "password:" not in text and "token:" not in text


# --- the contract with the CLI ------------------------------------------------------------------------------------


def test_router_service_and_ports_match_the_cli_defaults(render):
    defaults = ControlPlaneConfig()
    objects = render()
    service = find(objects, "Service", f"{FULLNAME}-router")
    port, http = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("grpc", defaults.router.port, "grpc")
    assert (http["name"], http["port"], http["targetPort"]) == ("http", defaults.router.http_port, "http")
    pod = find(objects, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == defaults.router.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": defaults.router.port}, probe
    command = shlex.split(" ".join(container["command"][2:] + container["args"]))
    serve = command[command.index("raylane") :]
    assert serve[:3] == ["raylane", "router", "serve"]
    assert serve[serve.index("--config") + 1] == "/etc/raylane/cluster.yaml"
    assert serve[serve.index("--port") + 1] == str(defaults.router.port)
    assert serve[serve.index("--http-port") + 1] == str(defaults.router.http_port)
    assert serve[serve.index("--host") + 1] == "0.0.0.0"
    assert serve[serve.index("--address") + 1] == "auto"
    # The router joins Ray through KubeRay's head Service, without CPUs for tasks.
    assert f"--address={FULLNAME}-head-svc:6379" in command and "--num-cpus=0" in command
    # The selector picks the router pods, and only them.
    pod_labels = find(objects, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/component"] == "router"

    admin = find(objects, "Service", f"{FULLNAME}-admin")
    assert admin["spec"]["type"] == "ClusterIP"
    assert admin["spec"]["ports"][0]["port"] == defaults.admin_port
    head = find(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]
    assert admin["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert head_ports["admin"] == defaults.admin_port


def test_chart_defaults_equal_the_cli_defaults():
    defaults = ControlPlaneConfig()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["router"]["port"] == defaults.router.port
    assert values["router"]["http"]["port"] == defaults.router.http_port
    assert values["router"]["config"] == {}  # every router setting defaults to RouterConfig's, policy included
    assert values["controlPlane"]["adminPort"] == defaults.admin_port
    assert values["controlPlane"]["metricsPort"] == defaults.metrics_port
    assert values["router"]["metricsPort"] == defaults.router.metrics_port
    assert values["controlPlane"]["reconcileIntervalS"] == defaults.reconcile_interval_s


@pytest.mark.parametrize("name", VALUES_FILES)
def test_cluster_config_and_deployments_load_in_the_control_plane(render, name, monkeypatch, tmp_path):
    for var in ("RAYLANE_STATE_DIR", "RAYLANE_REDIS_URL", "RAYLANE_ADMIN_PORT", "RAYLANE_ROUTER__PORT"):
        monkeypatch.delenv(var, raising=False)
    objects = render(VALUES_FILES[name])
    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text(find(objects, "ConfigMap", f"{FULLNAME}-cluster")["data"]["cluster.yaml"])
    config = ControlPlaneConfig.load(cluster_yaml)
    assert (config.admin_host, config.redis_url) == ("0.0.0.0", None)  # the URL comes from RAYLANE_REDIS_URL
    assert config.metrics_port == 9090  # controlPlane.metricsPort, what the ServiceMonitor scrapes on the head
    deployments = find(objects, "ConfigMap", f"{FULLNAME}-deployments").get("data") or {}
    values = yaml.safe_load(VALUES_FILES[name].read_text()) if VALUES_FILES[name] else {}
    assert len(deployments) == len(values.get("deployments", []))
    for file_name, text in deployments.items():
        spec = DeploymentSpec.from_yaml(text)
        assert file_name == f"{spec.name}.yaml"


def test_head_runs_the_control_plane_with_the_documented_flags(render):
    cluster = find(render(None, "apiKey.generate=true"), "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    script = container["lifecycle"]["postStart"]["exec"]["command"][-1]
    argv = shlex.split(script[script.index("exec raylane") :].removeprefix("exec "))
    argv = argv[: argv.index(next(a for a in argv if a.startswith(">")))]
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert argv[:2] == ["raylane", "up"] and argv[-1] == "--no-routers"
    assert flags["--address"] == "auto"
    assert flags["--config"] == "/etc/raylane/cluster.yaml"
    assert flags["--deployments-dir"] == "/etc/raylane/deployments"
    assert flags["--bootstrap-tenant"] == "default"
    assert flags["--bootstrap-key-file"] == "/etc/raylane/secrets/api-key"
    assert int(flags["--wait-for-ray"]) > 0
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts["/etc/raylane/secrets"]]["secret"]["items"] == [{"key": "api-key", "path": "api-key"}]
    assert volumes[mounts["/etc/raylane/deployments"]]["configMap"]["name"] == f"{FULLNAME}-deployments"
    assert volumes[mounts["/etc/raylane/cluster.yaml"]]["configMap"]["name"] == f"{FULLNAME}-cluster"
    # Without a key source no tenant is bootstrapped, and no Secret is made.
    objects = render()
    plain = find(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "--bootstrap" not in plain["lifecycle"]["postStart"]["exec"]["command"][-1]
    assert _secret_names(objects) == {"rl-raylane-admin-token"}  # the admin token is always there


def test_generated_api_key_is_random_and_kept(render):
    secret = find(render(None, "apiKey.generate=true"), "Secret", "rl-raylane-api-key")
    key = base64.b64decode(secret["data"]["api-key"]).decode()
    assert key.startswith("rl-") and len(key) == 43
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    existing = render(None, "apiKey.existingSecret=mine")
    assert _secret_names(existing) == {"rl-raylane-admin-token"}
    head = find(existing, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert {v["name"]: v for v in head["volumes"]}["api-key"]["secret"]["secretName"] == "mine"


# --- Ray cluster --------------------------------------------------------------------------------------------------


def test_worker_groups_autoscaling_and_accelerators(render):
    cluster = find(render(VALUES_FILES["h100-pd"]), "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Conservative"
    (group,) = cluster["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("h100", 1, 1, 4)
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "8"
    assert str(container["resources"]["requests"]["nvidia.com/gpu"]) == "8"
    assert container["image"] == "registry.example.com/ml/raylane:0.1.0-cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"] == "registry.example.com/ml/raylane:0.1.0"

    lora = find(render(VALUES_FILES["multitenant-lora"]), "RayCluster")["spec"]["workerGroupSpecs"]
    images = {g["groupName"]: g["template"]["spec"]["containers"][0]["image"] for g in lora}
    assert images == {"cpu": "ghcr.io/raylane/raylane:0.1.0", "l4": "ghcr.io/raylane/raylane:0.1.0-cuda"}


@pytest.mark.parametrize(
    ("name", "password_secret"),
    [("default", None), ("h100-pd", "raylane-redis"), ("multitenant-lora", "raylane-redis")],
)
def test_gcs_fault_tolerance_uses_the_control_planes_redis(render, name, password_secret):
    objects = render(VALUES_FILES[name])
    cluster = find(objects, "RayCluster")
    assert "ray.io/ft-enabled" not in (cluster["metadata"].get("annotations") or {})
    ft = cluster["spec"]["gcsFaultToleranceOptions"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = env_of(head)
    redis_url = env["RAYLANE_REDIS_URL"]["value"]
    host_port = redis_url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    assert ft["redisAddress"] == host_port
    assert ft["externalStorageNamespace"] == f"{FULLNAME}-gcs"
    if password_secret is None:
        assert "redisPassword" not in ft and "REDIS_PASSWORD" not in env
    else:
        ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
        assert ref == env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == password_secret
        assert redis_url.startswith("redis://:$(REDIS_PASSWORD)@")
    has_statefulset = any(o["kind"] == "StatefulSet" for o in objects)
    assert has_statefulset == (name != "multitenant-lora")


def test_redis_statefulset_keeps_an_append_only_file_on_a_pvc(render):
    redis = find(render(), "StatefulSet", f"{FULLNAME}-redis")["spec"]
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    (claim,) = redis["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    mounts = redis["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "data", "mountPath": "/data"} in mounts


# --- security -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUES_FILES)
def test_pods_run_as_non_root_with_a_read_only_root(render, name):
    for pod_name, pod in pod_specs(render(VALUES_FILES[name])).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, pod_name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, pod_name
            assert security["readOnlyRootFilesystem"] is True, pod_name
            assert security["capabilities"]["drop"] == ["ALL"], pod_name
        # Only the head talks to the Kubernetes API (the Ray autoscaler).
        if pod_name != "ray-head":
            assert pod["automountServiceAccountToken"] is False, pod_name


def test_rbac_is_namespaced_and_minimal(render):
    objects = render()
    assert not kinds(objects) & {"ClusterRole", "ClusterRoleBinding"}
    role = find(objects, "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    allowed = {("", "pods", v) for v in ("get", "list", "watch")} | {("ray.io", "rayclusters", "get")}
    allowed |= {("ray.io", "rayclusters", "patch")}
    assert granted <= allowed
    ray_rule = next(r for r in role["rules"] if r["apiGroups"] == ["ray.io"])
    assert ray_rule["resourceNames"] == [FULLNAME]
    binding = find(objects, "RoleBinding")
    account = find(objects, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    head = find(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == account


def test_network_policies_fence_the_workers_and_redis(render):
    objects = render()
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    ray_nodes = policies[f"{FULLNAME}-ray-nodes"]
    node_selector = ray_nodes["podSelector"]["matchLabels"]
    assert node_selector["raylane.io/ray-node"] == "true"
    (rule,) = ray_nodes["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": node_selector}}]
    # Every worker, the head and the routers carry the label the policy selects.
    for pod_name, pod_labels in _pod_labels(objects).items():
        if not pod_name.startswith("StatefulSet"):
            assert node_selector.items() <= pod_labels.items(), pod_name
    redis = policies[f"{FULLNAME}-redis"]
    assert redis["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": node_selector}}], "ports": [{"port": 6379, "protocol": "TCP"}]}
    ]
    router = policies[f"{FULLNAME}-router"]["ingress"]
    defaults = ControlPlaneConfig()
    ports = [{"port": defaults.router.port, "protocol": "TCP"}, {"port": defaults.router.http_port, "protocol": "TCP"}]
    assert router == [{"ports": ports}]
    lora_objects = render(VALUES_FILES["multitenant-lora"])
    lora = {o["metadata"]["name"]: o["spec"] for o in lora_objects if o["kind"] == "NetworkPolicy"}
    assert lora[f"{FULLNAME}-router"]["ingress"][0]["from"][0]["namespaceSelector"]
    assert f"{FULLNAME}-redis" not in lora


def _pod_labels(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {name: template["metadata"]["labels"] for name, template in pod_templates(objects).items()}


# --- router extras, observability, dependency, NOTES ----------------------------------------------------------------


def test_router_pdb_ingress_and_gateway(render):
    objects = render(VALUES_FILES["h100-pd"])
    pdb = find(objects, "PodDisruptionBudget")
    router = find(objects, "Deployment", f"{FULLNAME}-router")
    assert pdb["spec"]["selector"]["matchLabels"] == router["spec"]["selector"]["matchLabels"]
    ingress = find(objects, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-router", "port": {"name": "grpc"}}
    route = find(render(VALUES_FILES["multitenant-lora"]), "GRPCRoute")
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": f"{FULLNAME}-router", "port": 50051}]
    assert not kinds(render()) & {"Ingress", "GRPCRoute"}


def test_router_serves_the_openai_http_api_on_its_own_port(render):
    objects = render()
    service_ports = {p["name"]: p for p in find(objects, "Service", f"{FULLNAME}-router")["spec"]["ports"]}
    assert service_ports["http"]["port"] == 8000 and service_ports["http"]["targetPort"] == "http"
    [container] = find(objects, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"]["containers"]
    assert {"name": "http", "containerPort": 8000} in container["ports"]
    assert "--http-port 8000" in " ".join(container["args"])
    policy = find(objects, "NetworkPolicy", f"{FULLNAME}-router")
    assert {"port": 8000, "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
    # Off: no port anywhere, and the router is told so (`--http-port 0`).
    off = render(None, "router.http.enabled=false")
    assert "http" not in {p["name"] for p in find(off, "Service", f"{FULLNAME}-router")["spec"]["ports"]}
    [container] = find(off, "Deployment", f"{FULLNAME}-router")["spec"]["template"]["spec"]["containers"]
    assert "--http-port 0" in " ".join(container["args"]) and all(p["name"] != "http" for p in container["ports"])


def test_service_monitor_is_off_by_default_and_dashboard_is_valid_json(render):
    assert "ServiceMonitor" not in kinds(render())
    objects = render(VALUES_FILES["h100-pd"])
    monitor = find(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    metrics = find(objects, "Service", f"{FULLNAME}-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    dashboard = find(render(), "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["raylane.json"])
    assert board["title"] == "raylane" and len(board["panels"]) >= 6
    assert all(target["expr"] for panel in board["panels"] for target in panel.get("targets", []))


def test_kuberay_operator_is_an_optional_dependency():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (dependency,) = chart["dependencies"]
    assert dependency["name"] == "kuberay-operator"
    assert dependency["condition"] == "kuberay-operator.enabled"
    assert yaml.safe_load((CHART / "values.yaml").read_text())["kuberay-operator"] == {"enabled": False}


def test_notes_explain_how_to_reach_the_router(helm, chart_copy):
    result = run_helm(
        helm, "install", RELEASE, str(chart_copy), "--dry-run=client", "--namespace", NAMESPACE,
        "--set", "apiKey.generate=true", "-f", str(EXAMPLES / "cpu-dev.yaml"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = result.stdout[result.stdout.index("NOTES:") :]
    assert f"svc/{FULLNAME}-router 50051:50051" in notes
    assert f"kubectl get secret {FULLNAME}-api-key" in notes
    assert '"deployment": "chat"' in notes and "raylane.v1.Router/Complete" in notes


def test_install_script_is_idempotent(helm, tmp_path):
    script = REPO / "ci" / "install_helm.sh"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAYLANE_HELM": helm}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == helm
