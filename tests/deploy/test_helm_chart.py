"""The Helm chart as a tested API: lint, Kubernetes and KEDA schemas, then what it renders."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python

# Installed with kubernetes-validate; without types-jsonschema in the dev extras it is untyped.
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from .conftest import (
    API_ONLY_ENV,
    CHART,
    SETTINGS_ENV,
    URL_ENV,
    heartbeat_probe_exit_codes,
    load_settings,
    real_secrets,
)

KUBE_VERSION = "1.30.0"
RELEASE = "scan"
NAMESPACE = "cybersec"
SCHEMAS = Path(__file__).parent / "schemas"
VALUES_FILES = sorted(path.name for path in (CHART / "ci").glob("*-values.yaml"))
CASES = ["defaults", *VALUES_FILES]

Obj = dict[str, Any]

EXISTING_SECRET_DATA = {
    "broker-url": "amqp://scan:s3cret@mq.internal:5672//",
    "redis-url": "redis://cache.internal:6379/0",
    "database-url": "postgresql://scan:s3cret@db.internal:5432/cybersec",
    "api-keys": "k" * 32,
}


@dataclass(frozen=True)
class Rendered:
    values: Obj
    objects: list[Obj]

    def all(self, kind: str) -> list[Obj]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        found = [obj for obj in self.all(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
        return found[0]

    def maybe(self, kind: str, name: str) -> Obj | None:
        found = [obj for obj in self.all(kind) if obj["metadata"]["name"] == name]
        return found[0] if found else None

    def deployment(self, component: str) -> Obj:
        return self.get("Deployment", f"{FULLNAME}-{component}")

    def container(self, component: str, name: str | None = None) -> Obj:
        """The component's container named ``name`` (default: the component's own name; the
        worker pods also hold ``worker-critical``)."""
        containers: list[Obj] = self.deployment(component)["spec"]["template"]["spec"]["containers"]
        [found] = [c for c in containers if c["name"] == (name or component)]
        return found

    def container_env(self, component: str) -> dict[str, str]:
        """The container's environment as the kubelet would build it; a Secret the chart does not
        render (existingSecret) holds EXISTING_SECRET_DATA."""
        container = self.container(component)
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self.get("ConfigMap", source["configMapRef"]["name"])["data"])
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            ref = var["valueFrom"]["secretKeyRef"]
            secret = self.maybe("Secret", ref["name"])
            data = EXISTING_SECRET_DATA if secret is None else secret["stringData"]
            env[var["name"]] = data[ref["key"]]
        return env

    def env_names(self, component: str) -> set[str]:
        container = self.container(component)
        names = {var["name"] for var in container.get("env", [])}
        for source in container.get("envFrom", []):
            names |= set(self.get("ConfigMap", source["configMapRef"]["name"])["data"])
        return names


FULLNAME = f"{RELEASE}-cybersec-scan"


def values_of(case: str) -> Obj:
    if case == "defaults":
        return {}
    loaded: Obj = yaml.safe_load((CHART / "ci" / case).read_text())
    return loaded


def render(values: Obj) -> Rendered:
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        merged = chart.merge_values(values)
    objects = [
        obj
        for path, text in sorted(manifests.items())
        if path.endswith((".yaml", ".yml"))
        for obj in yaml.safe_load_all(text)
        if obj
    ]
    return Rendered(merged, objects)


@functools.cache
def render_case(case: str) -> Rendered:
    return render(values_of(case))


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def rendered(case: str) -> Rendered:
    return render_case(case)


def strict_crd_schema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema that rejects unknown fields, as the API server's
    strict field validation does (it prunes or refuses what the schema does not list)."""
    if isinstance(node, list):
        return [strict_crd_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_crd_schema(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def keda_validator(kind: str) -> jsonschema.Draft7Validator:
    document = yaml.safe_load((SCHEMAS / f"keda-{kind.lower()}.yaml").read_text())
    schema = strict_crd_schema(document["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# --- the chart as a whole ------------------------------------------------------------------


def test_chart_ships_the_values_examples() -> None:
    assert set(VALUES_FILES) == {
        "keda-values.yaml",
        "no-keda-values.yaml",
        "ingress-tls-values.yaml",
        "existing-secret-values.yaml",
        "readme-example-values.yaml",
    }


def test_lints_clean_in_strict_mode(case: str) -> None:
    report = helm_python.lint(CHART, values_of(case), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert problems == []
    assert report["errors"] == []


def test_every_object_is_valid_for_kubernetes(rendered: Rendered) -> None:
    kinds = {obj["kind"] for obj in rendered.objects}
    assert {"Deployment", "Service", "ConfigMap", "Job"} <= kinds
    for obj in rendered.objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            keda_validator(obj["kind"]).validate(obj)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_keda_schema_rejects_unknown_fields() -> None:
    scaled_object = render_case("keda-values.yaml").get("ScaledObject", f"{FULLNAME}-worker")
    bad = {**scaled_object, "spec": {**scaled_object["spec"], "maxReplicas": 3}}
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        keda_validator("ScaledObject").validate(bad)


@pytest.mark.parametrize(
    "values",
    [
        {"bogus": 1},
        {"api": {"ingress": {"tlsSecret": "x"}}},
        {"worker": {"autoscaling": {"keda": {"queue": "other"}}}},
        {"config": {"brokerUrl": "amqp://elsewhere//"}},
        {"networkPolicy": {"apiFrom": [{"namespaceSelektor": {}}]}},
    ],
    ids=["top", "ingress", "keda", "config", "peer"],
)
def test_schema_rejects_unknown_keys(values: Obj) -> None:
    with pytest.raises(helm_python.HelmValuesError, match="additional properties"):
        render(values)
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"]


@pytest.mark.parametrize(
    "values",
    [
        {"worker": {"shutdownGraceMargin": 0}},
        {"worker": {"shutdownTimeout": 601}},
        {"config": {"queuePrefix": "two words"}},
        {"api": {"autoscaling": {"minReplicas": 0}}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"worker": {"pool": "gevent"}},
    ],
    ids=[
        "grace-margin",
        "shutdown-bound",
        "queue-prefix",
        "min-replicas",
        "pull-policy",
        "worker-pool",
    ],
)
def test_schema_rejects_bad_values(values: Obj) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


# --- settings reach both services ----------------------------------------------------------


@pytest.mark.parametrize("component", ["api", "worker", "dispatcher"])
def test_every_setting_is_provided(rendered: Rendered, component: str) -> None:
    expected = SETTINGS_ENV if component == "api" else SETTINGS_ENV - API_ONLY_ENV
    names = {name for name in rendered.env_names(component) if name.startswith("CYBERSEC_")}
    assert names == expected, (
        f"missing: {sorted(expected - names)}, not expected: {sorted(names - expected)}"
    )
    container = rendered.container(component)
    secret_refs = {
        var["name"] for var in container["env"] if "secretKeyRef" in var.get("valueFrom", {})
    }
    expected_secrets = URL_ENV | API_ONLY_ENV if component == "api" else URL_ENV
    assert secret_refs == expected_secrets, "URLs and keys come from the Secret, nothing else does"


@pytest.mark.parametrize("component", ["api", "worker"])
def test_rendered_environment_parses_as_settings(
    rendered: Rendered, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = rendered.container_env(component)
    if any("change-me" in value for value in env.values()):
        # The chart's placeholder passwords are refused in production, as they must be.
        with pytest.raises(ValidationError, match="placeholder"):
            load_settings(monkeypatch, env)
        env = real_secrets(env)
    settings = load_settings(monkeypatch, env)
    values = rendered.values
    assert settings.queue_prefix == values["config"]["queuePrefix"]
    assert settings.shutdown_timeout == values["worker"]["shutdownTimeout"]
    assert settings.api_host == "0.0.0.0"
    ports = {port["name"]: port["containerPort"] for port in rendered.container(component)["ports"]}
    if component == "api":
        assert ports == {"http": settings.api_port}
    else:
        assert ports == {"metrics": settings.metrics_port}
    if not values["secrets"]["existingSecret"]:
        secrets = real_secrets({name: str(v) for name, v in values["secrets"].items()})
        assert settings.broker_url == secrets["brokerUrl"]
        assert settings.database_url == secrets["databaseUrl"]


def test_large_numbers_reach_the_environment_as_integers(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render({"config": {"resultTtl": 2_592_000, "maxHosts": 65_536}})
    env = rendered.container_env("worker")
    assert env["CYBERSEC_RESULT_TTL"] == "2592000"
    assert env["CYBERSEC_MAX_HOSTS"] == "65536"
    settings = load_settings(monkeypatch, real_secrets(env))
    assert (settings.result_ttl, settings.max_hosts) == (2_592_000, 65_536)


def test_the_threads_pool_reaches_both_worker_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: ``worker.pool: threads`` makes each worker container one process running
    ``concurrency`` scans; the critical container reads the same environment."""
    rendered = render({"worker": {"pool": "threads", "concurrency": 16}})
    env = rendered.container_env("worker")
    settings = load_settings(monkeypatch, real_secrets(env))
    assert (settings.worker_pool, settings.worker_concurrency) == ("threads", 16)
    critical = rendered.container("worker", "worker-critical")
    assert critical["envFrom"] == rendered.container("worker")["envFrom"]
    assert render_case("defaults").container_env("worker")["CYBERSEC_WORKER_POOL"] == "prefork"


# --- scaling -------------------------------------------------------------------------------


def test_keda_scales_workers_on_the_queue_they_consume(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = render_case("keda-values.yaml")
    scaling = rendered.values["worker"]["autoscaling"]
    worker_settings = load_settings(monkeypatch, real_secrets(rendered.container_env("worker")))
    scaled_object = rendered.get("ScaledObject", f"{FULLNAME}-worker")
    spec = scaled_object["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": rendered.deployment("worker")["metadata"]["name"],
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 40)
    trigger, critical_trigger = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    metadata = trigger["metadata"]
    assert metadata["queueName"] == worker_settings.scan_queue == "acme-prod.scans"
    # Critical scans waiting for the reserved containers scale the pods too (issue 15).
    assert critical_trigger == {
        **trigger,
        "metadata": {**metadata, "queueName": worker_settings.critical_queue},
    }
    assert worker_settings.critical_queue == "acme-prod.scans.critical"
    # Over the management API unacked (in-flight) messages count; over AMQP they would not.
    assert metadata["protocol"] == "http"
    assert metadata["mode"] == "QueueLength"
    assert metadata["value"] == str(scaling["keda"]["queueLength"])
    assert metadata["vhostName"] == "scans"
    assert "host" not in metadata, "the management URL holds a password: it comes from the Secret"

    auth = rendered.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    secret = rendered.get("Secret", ref["name"])
    assert secret["stringData"][ref["key"]].startswith("http")
    assert rendered.maybe("HorizontalPodAutoscaler", f"{FULLNAME}-worker") is None
    assert "replicas" not in rendered.deployment("worker")["spec"], "KEDA owns the replica count"


def test_without_keda_workers_get_a_cpu_hpa() -> None:
    rendered = render_case("no-keda-values.yaml")
    assert rendered.all("ScaledObject") == []
    assert rendered.all("TriggerAuthentication") == []
    hpa = rendered.get("HorizontalPodAutoscaler", f"{FULLNAME}-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-worker"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["averageUtilization"] == 60


def test_fixed_replicas_when_autoscaling_is_off() -> None:
    rendered = render_case("existing-secret-values.yaml")
    assert rendered.all("HorizontalPodAutoscaler") == []
    assert rendered.all("ScaledObject") == []
    assert rendered.deployment("api")["spec"]["replicas"] == 3
    assert rendered.deployment("worker")["spec"]["replicas"] == 4


def test_api_hpa_by_default() -> None:
    hpa = render_case("defaults").get("HorizontalPodAutoscaler", f"{FULLNAME}-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-api"


# --- probes, shutdown, security ------------------------------------------------------------


def test_api_probes(rendered: Rendered) -> None:
    container = rendered.container("api")
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_worker_liveness_is_heartbeat_age(rendered: Rendered, tmp_path: Path) -> None:
    container = rendered.container("worker")
    probe = container["livenessProbe"]
    command = probe["exec"]["command"]
    assert "inspect" not in " ".join(command)
    assert container["startupProbe"]["exec"]["command"] == command
    assert heartbeat_probe_exit_codes(command, tmp_path) == (0, 1, 1)
    max_age = rendered.values["worker"]["heartbeatMaxAge"]
    assert probe["periodSeconds"] * probe["failureThreshold"] + max_age <= 120


def test_every_worker_pod_runs_a_reserved_critical_container(
    rendered: Rendered, tmp_path: Path
) -> None:
    """Issue 15: ``python -m worker_service --critical`` beside the worker, same settings, its
    liveness read from the heartbeat file that node writes."""
    worker = rendered.container("worker")
    critical = rendered.container("worker", "worker-critical")
    assert critical["args"] == ["python", "-m", "worker_service", "--critical"]
    assert critical["image"] == worker["image"]
    assert critical["env"] == worker["env"]
    assert critical["envFrom"] == worker["envFrom"]
    assert "ports" not in critical, "its metrics are off: the pod has one metrics port"
    env = rendered.container_env("worker")
    assert env["CYBERSEC_CRITICAL_METRICS_PORT"] == "0"
    assert env["CYBERSEC_CRITICAL_CONCURRENCY"] == str(
        rendered.values["worker"]["critical"]["concurrency"]
    )
    command = critical["livenessProbe"]["exec"]["command"]
    assert critical["startupProbe"]["exec"]["command"] == command
    heartbeat = tmp_path / "heartbeat"
    probe_env = {**os.environ, "CYBERSEC_HEARTBEAT_FILE": str(heartbeat)}

    def probe() -> int:
        argv = [sys.executable, *command[1:]]
        return subprocess.run(argv, env=probe_env, timeout=30, check=False).returncode

    Path(f"{heartbeat}.critical").touch()
    assert probe() == 0
    Path(f"{heartbeat}.critical").unlink()
    heartbeat.touch()  # the normal node's file does not keep the critical one alive
    assert probe() == 1


def test_worker_grace_period_exceeds_shutdown_bound(rendered: Rendered) -> None:
    grace = rendered.deployment("worker")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    bound = int(rendered.container_env("worker")["CYBERSEC_SHUTDOWN_TIMEOUT"])
    assert grace >= bound + 5


def test_grace_period_follows_the_largest_bound() -> None:
    rendered = render({"worker": {"shutdownTimeout": 600}})
    spec = rendered.deployment("worker")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 610


def pod_specs(rendered: Rendered) -> list[Obj]:
    return [
        obj["spec"]["template"]["spec"]
        for obj in rendered.objects
        if obj["kind"] in {"Deployment", "Job"}
    ]


def test_nothing_runs_as_root(rendered: Rendered) -> None:
    specs = pod_specs(rendered)
    assert len(specs) == 4  # api, worker, dispatcher, migrations
    for spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] == 10001
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        mounts_tmp = {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context.get("runAsUser", pod["runAsUser"]) != 0
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            tmp_mount = {"name": "tmp", "mountPath": "/tmp"}  # noqa: S108 - an emptyDir
            assert tmp_mount in container["volumeMounts"]
            assert "tmp" in mounts_tmp
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind])


def test_service_account_mounts_no_token(rendered: Rendered) -> None:
    [account] = rendered.all("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for component in ("api", "worker"):
        spec = rendered.deployment(component)["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == account["metadata"]["name"]


# --- the other objects ---------------------------------------------------------------------


def test_migrations_run_as_a_pre_install_and_pre_upgrade_hook(rendered: Rendered) -> None:
    [job] = rendered.all("Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {
        "before-hook-creation",
        "hook-succeeded",
    }
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["cybersec", "migrate"]
    [database] = [var for var in container["env"] if var["name"] == "CYBERSEC_DATABASE_URL"]
    secret_name = database["valueFrom"]["secretKeyRef"]["name"]
    existing = rendered.values["secrets"]["existingSecret"]
    if existing:
        assert secret_name == existing
        return
    # A hook runs before the release's own objects exist: its Secret must be a hook too, earlier.
    secret = rendered.get("Secret", secret_name)
    hook_weight = int(secret["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert hook_weight < int(annotations["helm.sh/hook-weight"])
    assert secret["metadata"]["annotations"]["helm.sh/hook"] == annotations["helm.sh/hook"]


def test_existing_secret_replaces_the_charts_secret() -> None:
    rendered = render_case("existing-secret-values.yaml")
    assert rendered.all("Secret") == []
    for component in ("api", "worker"):
        refs = {
            var["valueFrom"]["secretKeyRef"]["name"]
            for var in rendered.container(component)["env"]
            if "valueFrom" in var
        }
        assert refs == {"cybersec-connections"}


def test_service_selects_the_api_pods(rendered: Rendered) -> None:
    service = rendered.get("Service", f"{FULLNAME}-api")
    labels = rendered.deployment("api")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_ingress_with_class_and_tls() -> None:
    rendered = render_case("ingress-tls-values.yaml")
    ingress = rendered.get("Ingress", f"{FULLNAME}-api")
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "scan-example-com-tls", "hosts": ["scan.example.com"]}]
    [rule] = spec["rules"]
    assert rule["host"] == "scan.example.com"
    paths = rule["http"]["paths"]
    assert [(p["path"], p["pathType"]) for p in paths] == PUBLIC_PATHS
    for path in paths:
        assert path["backend"]["service"] == {"name": f"{FULLNAME}-api", "port": {"name": "http"}}
    assert render_case("defaults").all("Ingress") == []


PUBLIC_PATHS = [
    ("/api", "Prefix"),
    ("/healthz", "Exact"),
    ("/readyz", "Exact"),
    ("/ui", "Prefix"),
    ("/", "Exact"),
]


@pytest.mark.parametrize(
    ("expose", "extra"),
    [
        ({}, []),
        ({"exposeDocs": True}, [("/docs", "Prefix"), ("/openapi.json", "Exact")]),
        ({"exposeMetrics": True}, [("/metrics", "Exact")]),
    ],
)
def test_ingress_routes_docs_and_metrics_only_when_asked(
    expose: Obj, extra: list[tuple[str, str]]
) -> None:
    """Before, the default path "/" published /metrics and /docs to the internet."""
    ingress = {"enabled": True, "hosts": [{"host": "scan.example.com"}], **expose}
    rendered = render({"api": {"ingress": ingress}})
    [rule] = rendered.get("Ingress", f"{FULLNAME}-api")["spec"]["rules"]
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == PUBLIC_PATHS + extra


def test_disruption_budgets_cover_both_deployments(rendered: Rendered) -> None:
    for component in ("api", "worker"):
        pdb = rendered.get("PodDisruptionBudget", f"{FULLNAME}-{component}")
        labels = rendered.deployment(component)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["maxUnavailable"] >= 1


def test_network_policies_restrict_ingress_and_worker_egress(rendered: Rendered) -> None:
    policies = rendered.all("NetworkPolicy")
    if not rendered.values["networkPolicy"]["enabled"]:
        assert policies == []
        return
    ports = {"api": "http", "worker": "metrics"}
    for component, port in ports.items():
        policy = rendered.get("NetworkPolicy", f"{FULLNAME}-{component}")
        expected = ["Ingress", "Egress"] if component == "worker" else ["Ingress"]
        assert policy["spec"]["policyTypes"] == expected
        labels = rendered.deployment(component)["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        for rule in policy["spec"]["ingress"]:
            assert rule["from"], "a rule without sources would admit everyone"
            assert rule["ports"] == [{"port": port, "protocol": "TCP"}]


def test_worker_egress_excludes_the_cluster_metadata_and_the_api_server() -> None:
    rendered = render({"workerEgress": {"kubernetesApi": ["172.18.0.2/32"]}})
    values = rendered.values
    egress = rendered.get("NetworkPolicy", f"{FULLNAME}-worker")["spec"]["egress"]
    targets, dns, *services = egress
    v4, v6 = (peer["ipBlock"] for peer in targets["to"])
    assert "ports" not in targets  # scan targets: any port
    assert v4["cidr"] == "0.0.0.0/0"
    assert v6["cidr"] == "::/0"
    for cidr in [*values["config"]["targetDeny"], "169.254.0.0/16", "100.100.100.200/32"]:
        assert cidr in v4["except"]
    assert "172.18.0.2/32" in v4["except"]
    assert {"fe80::/10", "fd00:ec2::254/128"} <= set(v6["except"])
    assert {p["port"] for p in dns["ports"]} == {53}
    # Inside the excluded networks the stack's services are reachable on their ports only.
    assert [[p["port"] for p in rule["ports"]] for rule in services] == [[5672], [6379], [5432]]
    assert all(rule["to"] for rule in services)


def test_the_dispatcher_reaches_webhook_receivers_under_the_worker_egress_rules() -> None:
    """Webhook receivers are outside addresses like scan targets: the same exclusions (the
    cluster, metadata, the API server) hold for the pod that sends to them."""
    rendered = render({"workerEgress": {"kubernetesApi": ["172.18.0.2/32", "fd00::1/128"]}})
    policy = rendered.get("NetworkPolicy", f"{FULLNAME}-dispatcher")["spec"]
    worker = rendered.get("NetworkPolicy", f"{FULLNAME}-worker")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == []
    labels = rendered.deployment("dispatcher")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["egress"] == worker["egress"]
    v4, v6 = (peer["ipBlock"] for peer in policy["egress"][0]["to"])
    assert {"169.254.0.0/16", "100.100.100.200/32", "168.63.129.16/32", "172.18.0.2/32"} <= set(
        v4["except"]
    )
    assert {"fe80::/10", "fd00:ec2::254/128", "fd00::1/128"} <= set(v6["except"])
    assert {5432, 5672} <= {p["port"] for rule in policy["egress"][2:] for p in rule["ports"]}
    without = render({"dispatcher": {"enabled": False}})
    assert all(
        not p["metadata"]["name"].endswith("-dispatcher") for p in without.all("NetworkPolicy")
    )


def test_an_empty_target_deny_needs_an_acknowledgement() -> None:
    with pytest.raises(Exception, match="acknowledgeOpenInward"):
        render({"config": {"targetDeny": []}})
    rendered = render(
        {"config": {"targetDeny": []}, "targetPolicy": {"acknowledgeOpenInward": True}}
    )
    assert rendered.container_env("worker").get("CYBERSEC_TARGET_DENY", "") == ""


def test_api_admits_nobody_when_no_source_is_listed() -> None:
    rendered = render({"networkPolicy": {"apiFrom": []}})
    policy = rendered.get("NetworkPolicy", f"{FULLNAME}-api")
    assert policy["spec"]["ingress"] == []


def test_prometheus_finds_both_services(rendered: Rendered) -> None:
    for component, port_key in (("api", "port"), ("worker", "metricsPort")):
        template = rendered.deployment(component)["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert annotations["prometheus.io/port"] == str(rendered.values[component][port_key])
    assert rendered.container("worker")["ports"][0]["name"] == "metrics"


def test_two_dispatchers_run_the_schedules(rendered: Rendered, tmp_path: Path) -> None:
    assert rendered.deployment("dispatcher")["spec"]["replicas"] == 2
    container = rendered.container("dispatcher")
    assert container["args"] == ["python", "-m", "api_service.dispatcher"]
    assert "ports" not in container
    assert "CYBERSEC_API_KEYS" not in {var["name"] for var in container["env"]}
    heartbeat = rendered.container_env("dispatcher")["CYBERSEC_DISPATCHER_HEARTBEAT_FILE"]
    assert heartbeat.startswith("/tmp/")  # noqa: S108 - the emptyDir; the root fs is read-only
    command = container["livenessProbe"]["exec"]["command"]
    assert container["startupProbe"]["exec"]["command"] == command
    # The shared probe runner sets the worker's variable; the dispatcher's probe reads its own.
    probe = [part.replace("CYBERSEC_DISPATCHER_", "CYBERSEC_") for part in command]
    assert heartbeat_probe_exit_codes(probe, tmp_path) == (0, 1, 1)


def test_the_dispatcher_can_be_left_out() -> None:
    assert (
        render({"dispatcher": {"enabled": False}}).maybe("Deployment", f"{FULLNAME}-dispatcher")
        is None
    )


def test_the_dashboard_stays_private_when_asked() -> None:
    ingress = {"enabled": True, "hosts": [{"host": "scan.example.com"}], "exposeUi": False}
    rendered = render({"api": {"ingress": ingress}})
    [rule] = rendered.get("Ingress", f"{FULLNAME}-api")["spec"]["rules"]
    paths = [p["path"] for p in rule["http"]["paths"]]
    assert paths == ["/api", "/healthz", "/readyz"]
