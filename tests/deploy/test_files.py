"""The deployment files, validated by the real tools (SPEC §9): the Compose specification (compose-spec, a
strict parser generated from the official schema) for every variant and profile, hadolint, kubernetes-validate,
promtool and nginx -t; plus the cross-references no schema checks (mounted files exist, dependencies exist and
have health checks, grace periods nest, the HTTP port is the same one from the Dockerfile to nginx and the probes),
and the image's dependencies (pinned, and installable offline from a filled wheelhouse).
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from harness.deploy_native import NGINX_CONFIG, PROMETHEUS_CONFIG, nginx_config_for_loopback, tool
from harness.server import REPO_ROOT
from server.registry import repository
from tests.helpers.deploy_files import (
    COMPOSE_OVERRIDES,
    KUBERNETES,
    active_services,
    compose_model,
    json_patch,
    kustomize,
)

VARIANTS = [(), ("replicated",), ("gpu",), ("replicated", "gpu")]
PROFILES = [set(), {"loadtest"}]
KUBERNETES_VERSION = "1.34.0"
IMAGE_SERVICES = ("model-export", "server", "loadtest")  # the services that run our image
GRPC_PORT, HTTP_PORT = 50051, 8000  # the image's ports (Dockerfile), the same everywhere below
WHEELHOUSE = REPO_ROOT / "deploy" / "docker" / "wheelhouse"


def _variant_id(overrides: tuple[str, ...]) -> str:
    return "+".join(overrides) or "base"


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"expected a duration in seconds like '30s', got {duration!r}"
    return float(match.group(1))


def _validate_compose(model: dict[str, Any]) -> None:
    compose = PyCompose.from_json(json.dumps(model))
    compose.validate()
    compose.to_spec()


# --- Compose ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", VARIANTS, ids=_variant_id)
def test_compose_variant_follows_the_compose_specification(overrides: tuple[str, ...]) -> None:
    model = compose_model(*overrides)
    _validate_compose(model)
    assert {"model-export", "server", "nginx", "prometheus", "grafana", "loadtest"} <= set(model["services"])


def test_compose_validation_can_fail() -> None:
    model = compose_model()
    model["services"]["server"]["healthcheks"] = model["services"]["server"].pop("healthcheck")
    with pytest.raises(ValueError, match="healthcheks"):
        _validate_compose(model)


@pytest.mark.parametrize("overrides", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: ",".join(sorted(p)) or "default")
def test_compose_dependencies_and_mounts_resolve(overrides: tuple[str, ...], profiles: set[str]) -> None:
    model = compose_model(*overrides)
    services = model["services"]
    active = active_services(model, profiles)
    assert ("loadtest" in active) == ("loadtest" in profiles)
    for name in active:
        service = services[name]
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in active, f"{name} depends on {dependency}, which does not run with {profiles}"
            target = services[dependency]
            if spec["condition"] == "service_healthy":
                assert not target.get("healthcheck", {}).get("disable"), f"{dependency} has no health check"
                assert "test" in target["healthcheck"], f"{dependency}: service_healthy needs a health check"
            if spec["condition"] == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dependency} is one-shot and must not restart"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in model["volumes"], f"{name} mounts undeclared volume {source}"
        if "build" in service:
            context = REPO_ROOT / service["build"]["context"]
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file()


@pytest.mark.parametrize("overrides", VARIANTS, ids=_variant_id)
def test_compose_servers_drain_within_the_stop_grace_period(overrides: tuple[str, ...]) -> None:
    server = compose_model(*overrides)["services"]["server"]
    env = server["environment"]
    assert env["MODELSERVER_HOST"] == "0.0.0.0"
    drain = float(env["MODELSERVER_SHUTDOWN_DELAY"]) + float(env["MODELSERVER_GRACE_PERIOD"])
    assert _seconds(server["stop_grace_period"]) > drain, "docker would SIGKILL a draining server"
    assert server["restart"] == "unless-stopped"
    assert "ports" not in server, "replicas are reached through nginx; a host port would clash between them"


@pytest.mark.parametrize("overrides", VARIANTS, ids=_variant_id)
def test_compose_exposes_the_http_port_through_nginx(overrides: tuple[str, ...]) -> None:
    """The servers' HTTP port (REST APIs and /metrics) is on the compose network, nginx publishes it on loopback, and
    nginx.conf proxies its listener there to the servers' HTTP port."""
    services = compose_model(*overrides)["services"]
    env = services["server"]["environment"]
    assert int(env["MODELSERVER_HTTP_PORT"]) == int(env["MODELSERVER_METRICS_PORT"]) == HTTP_PORT
    assert {int(p) for p in services["server"]["expose"]} == {GRPC_PORT, HTTP_PORT}
    published = {int(p.rsplit(":", 1)[1]): p for p in services["nginx"]["ports"]}
    assert set(published) == {GRPC_PORT, HTTP_PORT}
    assert all(p.startswith("127.0.0.1:") for p in published.values()), "published on loopback only"
    config = NGINX_CONFIG.read_text()
    assert f"server server:{HTTP_PORT};" in config and f"listen {HTTP_PORT};" in config


def test_compose_variants_scale_and_reserve_gpus() -> None:
    assert compose_model()["services"]["server"]["deploy"]["replicas"] == 1
    assert compose_model("replicated")["services"]["server"]["deploy"]["replicas"] >= 2
    for overrides in (("gpu",), ("replicated", "gpu")):
        services = compose_model(*overrides)["services"]
        devices = services["server"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        # One image for every service that runs it, built once with the CUDA libraries.
        builds = {json.dumps([services[s]["build"], services[s]["image"]]) for s in IMAGE_SERVICES}
        assert len(builds) == 1 and services["server"]["build"]["args"]["TENSORFLOW_EXTRA"] == "and-cuda"
    base = compose_model()["services"]
    assert len({json.dumps([base[s]["build"], base[s]["image"]]) for s in IMAGE_SERVICES}) == 1


def test_override_files_only_name_services_of_the_base_file() -> None:
    base = set(compose_model()["services"])
    for path in COMPOSE_OVERRIDES.values():
        assert set(yaml.safe_load(path.read_text())["services"]) <= base, path.name


# --- Dockerfile ---------------------------------------------------------------------------------------------------


def _dockerfile() -> str:
    return (REPO_ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pattern.removeprefix("**/")) for pattern in patterns for p in prefixes)


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [s for line in re.findall(r"^COPY (.+)$", _dockerfile(), re.MULTILINE) for s in line.split()[:-1]]
    assert "requirements.lock" in sources and "server/" in sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such file"
        assert not _ignored(source.rstrip("/"), patterns), f"COPY {source} is excluded by .dockerignore"
    assert _ignored("tests/integration/test_api.py", patterns) and _ignored(".venv/bin/python", patterns)


def test_dockerfile_runs_as_non_root_with_exec_entrypoint_and_grpc_health_check() -> None:
    dockerfile = _dockerfile()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.MULTILINE)
    assert re.search(rf"^EXPOSE {GRPC_PORT} {HTTP_PORT}$", dockerfile, re.MULTILINE)
    assert f"MODELSERVER_HTTP_PORT={HTTP_PORT}" in dockerfile and f"MODELSERVER_METRICS_PORT={HTTP_PORT}" in dockerfile
    assert re.search(r'^ENTRYPOINT \["python", "-m", "server"\]$', dockerfile, re.MULTILINE)
    assert "MODELSERVER_HOST=0.0.0.0" in dockerfile
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[.*-m clients .* health", dockerfile, re.MULTILINE)


def test_export_script_exports_every_builtin_model_once(tmp_path: Path) -> None:
    """The compose `model-export` step: models written once, then found intact (the servers export nothing)."""
    command = [sys.executable, "deploy/docker/export_models.py", "--model-repository", str(tmp_path)]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(": exported in") == 3, first.stdout
    for name in ("multi_input", "shared_layer", "residual_cnn"):
        assert repository.is_intact(tmp_path / name / "1")
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout.count(": already intact in") == 3, second.stdout


# --- Kubernetes ---------------------------------------------------------------------------------------------------

OVERLAYS = {"base": KUBERNETES / "base", "gpu": KUBERNETES / "overlays" / "gpu"}


@pytest.mark.parametrize("variant", OVERLAYS)
def test_kubernetes_manifests_validate(variant: str) -> None:
    documents = kustomize(OVERLAYS[variant])
    assert sorted(d["kind"] for d in documents) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_can_fail() -> None:
    deployment = next(d for d in kustomize(OVERLAYS["base"]) if d["kind"] == "Deployment")
    broken = json_patch(
        deployment, [{"op": "add", "path": "/spec/template/spec/containers/0/livenesProbe", "value": {}}]
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _deployment(variant: str) -> dict[str, Any]:
    return next(d for d in kustomize(OVERLAYS[variant]) if d["kind"] == "Deployment")


def test_kubernetes_probes_grace_and_resources() -> None:
    pod = _deployment("base")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(env["MODELSERVER_GRPC_PORT"]), "http": int(env["MODELSERVER_HTTP_PORT"])}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT} and env["MODELSERVER_METRICS_PORT"] == str(HTTP_PORT)
    # Started: the gRPC health service says SERVING (native probe); then ready and alive over HTTP, on the Open
    # Inference Protocol's health endpoints (no token needed), by the port's name.
    assert container["startupProbe"]["grpc"] == {"port": ports["grpc"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    drain = float(env["MODELSERVER_SHUTDOWN_DELAY"]) + float(env["MODELSERVER_GRACE_PERIOD"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's USER
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])


def test_kubernetes_services_budget_and_autoscaler_select_the_deployment() -> None:
    documents = kustomize(OVERLAYS["base"])
    labels = _deployment("base")["spec"]["template"]["metadata"]["labels"]
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    assert services["modelserver-headless"]["spec"]["clusterIP"] == "None"
    for service in services.values():  # both name both ports, by the container ports' names
        ports = {p["name"]: (p["port"], p["targetPort"], p["appProtocol"]) for p in service["spec"]["ports"]}
        assert ports == {"grpc": (GRPC_PORT, "grpc", "kubernetes.io/h2c"), "http": (HTTP_PORT, "http", "http")}
    for document in documents:
        if document["kind"] == "Service":
            assert document["spec"]["selector"] == labels
        if document["kind"] == "PodDisruptionBudget":
            assert document["spec"]["selector"]["matchLabels"] == labels
        if document["kind"] == "HorizontalPodAutoscaler":
            assert document["spec"]["scaleTargetRef"]["name"] == "modelserver"
            assert document["spec"]["minReplicas"] >= 2


def test_kubernetes_gpu_overlay_limits_one_gpu() -> None:
    container = _deployment("gpu")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-gpu")
    assert (
        "nvidia.com/gpu" not in _deployment("base")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((OVERLAYS["base"] / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in OVERLAYS["base"].glob("*.yaml")} - {"kustomization.yaml"}


# --- Prometheus and nginx configs ---------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    check = [tool("promtool"), "check", "config"]
    result = subprocess.run([*check, str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROMETHEUS_CONFIG.read_text().replace("scrape_timeout: 4s", "scrape_timeout: 40s"))
    assert subprocess.run([*check, str(broken)], capture_output=True).returncode != 0


def test_nginx_config_passes_nginx_t_with_grpc_module(tmp_path: Path) -> None:
    config = tmp_path / "nginx.conf"
    # nginx_config_for_loopback moves the gRPC and the HTTP part's replica and listen lines to loopback.
    config.write_text(
        nginx_config_for_loopback(NGINX_CONFIG.read_text(), 50051, ["127.0.0.1:1", "127.0.0.1:2"], tmp_path)
    )
    result = subprocess.run(
        [tool("nginx"), "-p", str(tmp_path), "-c", str(config), "-e", "stderr", "-t"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "grpc_pass grpc://modelserver;" in config.read_text()


def test_nginx_proxies_the_rest_apis_with_limits() -> None:
    """/v1 and /v2 go to the servers' HTTP port over keep-alive HTTP/1.1, bodies up to just above the server's own
    limit (so that its JSON 413 is what clients see), nginx's own refusals as JSON; the gRPC part is unchanged."""
    config = NGINX_CONFIG.read_text()
    http = config[config.index("upstream modelserver_http") :]
    assert "location ~ ^/v[12](/|$) {" in http and "proxy_pass http://modelserver_http;" in http
    for directive in ("proxy_http_version 1.1;", 'proxy_set_header Connection "";', "limit_conn modelserver_calls"):
        assert directive in http, directive
    body_limit = re.search(r"client_max_body_size (\d+)m;", http)
    assert body_limit is not None and int(body_limit.group(1)) << 20 > 16 << 20  # --max-receive-message-bytes
    for status in ("413", "429", "502 503", "504"):
        assert re.search(rf"error_page {status} = @http_\w+;", http), status
    assert re.findall(r"return (\d+) '\{\"error\": ", http) == ["404", "429", "413", "503", "504"]
    assert "grpc_pass grpc://modelserver;" in config[: config.index("upstream modelserver_http")]


# --- The image's dependencies -------------------------------------------------------------------------------------


def _locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", (REPO_ROOT / "requirements.lock").read_text(), re.MULTILINE)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_image_dependencies_are_pinned_in_the_lock() -> None:
    """The image installs pyproject's runtime dependencies with requirements.lock as constraints: each one pinned
    there at the same version, the HTTP stack's (uvicorn, httptools, orjson, and click and h11 under uvicorn) too."""
    locked = _locked()
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        pinned = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]+\])?==(\S+)", requirement)
        assert pinned is not None, f"{requirement}: runtime dependencies are pinned with =="
        assert locked.get(pinned.group(1).lower().replace("_", "-")) == pinned.group(2), requirement
    http_stack = {"uvicorn": "0.55.0", "httptools": "0.9.0", "orjson": "3.13.0"}
    assert {name: locked.get(name) for name in http_stack} == http_stack
    assert locked.get("click") and locked.get("h11")


def test_filled_wheelhouse_installs_the_image_offline(tmp_path: Path) -> None:
    """What the Dockerfile's install does from a filled wheelhouse (`make wheelhouse`), resolved without installing:
    every runtime dependency, and theirs, from the wheels alone (no index, nor the host's pip configuration)."""
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.skip("the wheelhouse is empty (`make wheelhouse` fills it); the image would install from PyPI")
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(dependencies) + "\n")
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
               "--no-index", "--find-links", str(WHEELHOUSE), "-r", str(requirements), "-c", "requirements.lock",
               "-c", "deploy/docker/requirements-gpu.lock", "--report", str(report)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={"PIP_CONFIG_FILE": "/dev/null", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, "the wheelhouse is missing wheels (run `make wheelhouse`):\n" + result.stderr
    installed = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    locked = _locked()
    for name in ("uvicorn", "httptools", "orjson", "click", "h11"):
        assert installed.get(name) == locked[name], name


# --- README -------------------------------------------------------------------------------------------------------


def test_readme_deployment_section_names_files_that_exist() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Deployment") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    paths = set(re.findall(r"(?<![\w/.-])((?:deploy|\.ci)/[\w./-]*\w|docker-compose[\w.]*\.yml|Dockerfile)", section))
    assert {"docker-compose.yml", "Dockerfile", "deploy/nginx/nginx.conf"} <= paths
    for path in paths:
        assert (REPO_ROOT / path).exists(), f"README names {path}, which does not exist"
