"""The infra files are valid without Docker or Kubernetes: infra/docker-compose.yml against the
Compose Specification's schema, the Kubernetes base job template's rendered Job against the
batch/v1 Job schema, prefect.yaml through Prefect's own models (see tests/unit/schemas/)."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from flows.config import PipelineConfig
from tests.conftest import REPO

SCHEMAS = Path(__file__).parent / "schemas"
COMPOSE = REPO / "infra" / "docker-compose.yml"
JOB_TEMPLATE = REPO / "infra" / "k8s" / "base-job-template.json"
PREFECT_YAML = REPO / "prefect.yaml"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)
URL_PASSWORD = re.compile(r"://[^/:@\s]+:([^@\s]+)@")


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env_items(service: dict[str, Any]) -> list[tuple[str, str]]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return [tuple(item.split("=", 1)) for item in environment]  # type: ignore[misc]
    return [(key, str(value)) for key, value in environment.items()]


def test_compose_file_matches_the_compose_spec():
    jsonschema.validate(_compose(), _schema("compose-spec.json"))


def test_every_published_port_binds_loopback_or_a_configured_address():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith(
                ("127.0.0.1:", "${SIFT_BIND_ADDRESS:-127.0.0.1}:")
            ), f"{name}: port {port!r} would listen on every interface"


def test_no_credential_is_written_in_the_compose_file():
    for name, service in _compose()["services"].items():
        for key, value in _env_items(service):
            if SECRET_NAME.search(key):
                assert value.startswith("${"), f"{name}: {key} is a literal, not ${{VAR}}"
            for password in URL_PASSWORD.findall(value):
                assert password.startswith("${"), f"{name}: {key} holds a literal password"
    assert "PASSWORD=\n" in (REPO / "infra" / ".env.example").read_text()  # no sample secret


def test_every_image_is_pinned_to_a_version_tag():
    for name, service in _compose()["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image!r} is not pinned"
        for line in service.get("build", {}).get("dockerfile_inline", "").splitlines():
            if line.startswith("FROM "):
                base = line.split()[1]
                assert re.search(r":v?\d", base), f"{name}: base image {base!r} is not pinned"


def test_services_name_only_defined_networks_volumes_and_services():
    compose = _compose()
    services, networks = compose["services"], set(compose.get("networks", {}))
    volumes = set(compose.get("volumes", {}))
    for name, service in services.items():
        assert set(service.get("networks", [])) <= networks, name
        assert set(service.get("depends_on", {})) <= set(services) - {name}, name
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in volumes, f"{name}: {mount}"


def test_every_variable_the_compose_file_reads_is_in_env_example():
    example = (REPO / "infra" / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    # ${VAR}, ${VAR:-default}, ${VAR:?message}; $${VAR} is the container's own variable.
    read = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    assert read <= documented, sorted(read - documented)


def _job_template() -> dict[str, Any]:
    return json.loads(JOB_TEMPLATE.read_text())


def _rendered_job(values: dict[str, Any]) -> dict[str, Any]:
    """The Job a Kubernetes worker submits: the variables' defaults plus `values` applied the
    way Prefect's workers apply them (BaseJobConfiguration.from_template_and_values), then the
    Kubernetes worker's own rewrites (prefect-kubernetes, KubernetesWorkerJobConfiguration
    .prepare_for_flow_run): env mapping → list of name/value, the command string → args."""
    from prefect.utilities.templating import apply_values

    template = _job_template()
    properties = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in properties.items() if v.get("default") is not None}
    configuration = apply_values(template["job_configuration"], defaults | values)
    job = configuration["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = shlex.split(container["args"])
    return job


SAMPLE = {
    "name": "sift-nightly-k8s-abc12",
    "command": "prefect flow-run execute",
    "env": {"PREFECT_API_URL": "http://prefect.sift.svc:4200/api"},
    "labels": {"prefect.io/deployment-name": "sift-nightly-k8s"},
    "image": "registry.example.com/sift:0.1.0",
}


def test_rendered_job_matches_the_kubernetes_job_schema():
    job = _rendered_job(SAMPLE)
    pod = job["spec"]["template"]["spec"]
    # The worker refuses a template without these (its _get_base_job_manifest), though a
    # PodSpec has no such fields; the API server drops them with a warning.
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    jsonschema.validate(job, _schema("k8s-job-batch-v1.json"))


def test_rendered_job_asks_for_a_gpu_node_and_reads_its_secret():
    job = _rendered_job(SAMPLE | {"gpu_count": 2, "secret_name": "sift-prod"})
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "sift-prod"}}]
    assert container["image"] == SAMPLE["image"] and container["name"] == "prefect-job"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["serviceAccountName"] == "sift-runner" and pod["restartPolicy"] == "Never"
    assert job["metadata"]["namespace"] == "sift"


def test_job_template_passes_prefects_work_pool_validation():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = _job_template()
    WorkPoolCreate(name="sift-gpu", type="kubernetes", base_job_template=template)
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    for spec in template["variables"]["properties"].values():
        if "default" in spec:
            jsonschema.validate(spec["default"], spec)


def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _deployments() -> dict[str, Any]:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(_prefect_yaml())
    return {deployment.name: deployment for deployment in model.deployments}


def test_prefect_yaml_names_the_nightly_deployments_and_their_pools():
    deployments = _deployments()
    assert set(deployments) == {"sift-nightly", "sift-nightly-k8s"}
    pools = {name: d.work_pool.name for name, d in deployments.items() if d.work_pool}
    assert pools == {"sift-nightly": "sift-process", "sift-nightly-k8s": "sift-gpu"}
    for deployment in deployments.values():
        assert deployment.schedules and deployment.schedules[0].cron == "0 2 * * *"


def test_deployment_parameters_are_a_valid_pipeline_config():
    for name, deployment in _deployments().items():
        assert set(deployment.parameters) == {"config", "project_dir"}, name
        config = PipelineConfig.model_validate(deployment.parameters["config"])
        assert config.schedule.skip_unchanged and config.select.prior == "champion"


def test_k8s_job_variables_match_the_pool_template():
    variables = _job_template()["variables"]
    job_variables = _deployments()["sift-nightly-k8s"].work_pool.job_variables
    assert set(job_variables) <= set(variables["properties"])
    jsonschema.validate(job_variables, variables)


def _flow_name(path: Path, function: str) -> str | None:
    """The name= of the @flow(...) decorating `function` in `path` (read, not imported)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") == "flow":
                    for keyword in decorator.keywords:
                        if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                            return str(keyword.value.value)
    return None


@pytest.mark.parametrize("name", ["sift-nightly", "sift-nightly-k8s"])
def test_entrypoint_is_the_sift_pipeline_flow(name):
    entrypoint = _deployments()[name].entrypoint
    assert entrypoint is not None
    path, _, function = entrypoint.partition(":")
    assert _flow_name(REPO / path, function) == "sift-pipeline"
