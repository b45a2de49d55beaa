"""The deployment files in deploy/: the Kubernetes manifests validate against the Kubernetes API schemas
(kubernetes-validate, strict: an unknown or misspelt field fails; its schemas ship in the package, offline), the
compose file against the Compose Specification schema (the copy check-jsonschema ships), and both only set
settings the server accepts, probe routes it serves and wire their parts together (ports, names, volumes)."""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kit.paths import REPO_ROOT

from server.api.state import STATE
from server.app import create_app
from server.settings.config import ServerConfig

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# the oldest Kubernetes release still in wide use, and the newest the validator knows
VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> dict[str, dict]:
    """kind/name -> resource, over every manifest the kustomization lists."""
    listed = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    return {f"{d['kind']}/{d['metadata']['name']}": d for name in listed for d in _docs(KUBERNETES / name)}


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {i["name"] for i in kustomization["images"]}
    containers = _manifests()["Deployment/vexpress-rt"]["spec"]["template"]["spec"]["containers"]
    assert {c["image"] for c in containers} <= images


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates_against_the_kubernetes_schemas(name, version):
    for doc in _docs(KUBERNETES / name):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_misspelt_field():
    deployment = copy.deepcopy(_manifests()["Deployment/vexpress-rt"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def _server_env(resources: dict[str, dict]) -> dict[str, str]:
    return {**resources["ConfigMap/vexpress-rt"]["data"], **resources["Secret/vexpress-rt"]["stringData"]}


def test_the_deployment_wires_gpu_probes_settings_and_routes(model_dir, tiny_engine):
    resources = _manifests()
    pod = resources["Deployment/vexpress-rt"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # the settings are ones `serve` accepts (the same parsing as the container's environment)
    config = ServerConfig.from_env(_server_env(resources))
    assert config.host == "0.0.0.0" and config.devices == "all" and config.api_key and config.turn_secret
    assert container["ports"][0]["containerPort"] == config.port
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == config.model_dir and mounts["models"]["readOnly"]
    assert {v["name"] for v in pod["volumes"]} == set(mounts)
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] in {
        r["metadata"]["name"] for k, r in resources.items() if k.startswith("PersistentVolumeClaim/")
    }
    # the probes' routes are served (the app the container runs, on the tiny engine)
    app = create_app(ServerConfig(width=128, height=64), engine=tiny_engine)
    routes = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    assert app[STATE].engine.engines == [tiny_engine]
    # the Service selects the pods and targets the named port; the Ingress routes to the Service, sticky
    service = resources["Service/vexpress-rt"]["spec"]
    labels = resources["Deployment/vexpress-rt"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items() and service["ports"][0]["targetPort"] == "http"
    ingress = resources["Ingress/vexpress-rt"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "vexpress-rt", "port": {"name": "http"}}
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert ingress["spec"]["rules"][0]["host"] in config.allowed_host
    assert ingress["spec"]["tls"][0]["hosts"] == [ingress["spec"]["rules"][0]["host"]]
    # coturn shares the server's TURN secret
    coturn = resources["Deployment/coturn"]["spec"]["template"]["spec"]["containers"][0]
    assert coturn["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "vexpress-rt", "key": "VEXPRESS_TURN_SECRET"}


def _compose_schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_compose_file_validates_and_reserves_the_gpus():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    validator = jsonschema.validators.validator_for(_compose_schema())(_compose_schema())
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    typo = copy.deepcopy(compose)
    typo["services"]["vexpress-rt"]["enviroment"] = {}
    assert list(validator.iter_errors(typo)), "the schema rejects unknown keys"
    server = compose["services"]["vexpress-rt"]
    (gpus,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and gpus["count"] == "all" and "gpu" in gpus["capabilities"]
    # its environment, with the variables compose fills in, is a configuration `serve` accepts
    env = {
        k: str(v).replace("${VEXPRESS_API_KEY:?set VEXPRESS_API_KEY in deploy/.env}", "key")
        for k, v in server["environment"].items()
        if "${" not in str(v) or k == "VEXPRESS_API_KEY"
    }
    config = ServerConfig.from_env(env)
    assert config.devices == "all" and config.tls_cert and config.model_dir == "/models"
