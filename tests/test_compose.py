"""docker-compose.yaml: valid against the Compose Specification, and the intended Celery/GPU topology.

No Docker engine is needed: the schema is the official one shipped by ``check-jsonschema``.
"""

from __future__ import annotations

import importlib.resources
import json
import re

import jsonschema
import pytest
import yaml

from fashion_tagging.settings import PROJECT_ROOT

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yaml"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-worker-gpu", "airflow-init"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def test_valid_against_compose_specification(compose, compose_schema):
    validator = jsonschema.Draft202012Validator(compose_schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_schema_rejects_a_broken_file(compose, compose_schema):
    """Guards the test above against a schema that accepts anything."""
    broken = {**compose, "services": {**compose["services"], "redis": {"image": "redis", "ports": {"bad": 1}}}}
    assert list(jsonschema.Draft202012Validator(compose_schema).iter_errors(broken))


def test_services(compose):
    services = set(compose["services"])
    assert AIRFLOW_SERVICES | {"postgres", "redis", "minio", "minio-init"} <= services
    assert compose["services"]["postgres"]["image"].startswith("pgvector/pgvector:pg17")


def test_airflow_services_share_the_project_image_and_celery_config(compose):
    for name in AIRFLOW_SERVICES:
        service = compose["services"][name]
        assert service["build"]["dockerfile"] == "Dockerfile", name
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://") and "redis:6379" in env[
            "AIRFLOW__CELERY__BROKER_URL"], name
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://"), name
        assert env["FT_DATABASE_URL"].endswith("@postgres/catalog"), name
        assert env["FT_S3_ENDPOINT_URL"] == "http://minio:9000", name


def _queues(command: str) -> set[str]:
    match = re.search(r"(?:--queues|-q)[ =](\S+)", command)
    return set(match.group(1).split(",")) if match else set()


def test_workers_split_default_and_gpu_queues(compose):
    worker = compose["services"]["airflow-worker"]
    gpu_worker = compose["services"]["airflow-worker-gpu"]
    assert worker["command"].startswith("celery worker") and _queues(worker["command"]) == {"default"}
    assert gpu_worker["command"].startswith("celery worker") and _queues(gpu_worker["command"]) == {"gpu"}
    assert gpu_worker["environment"]["FT_GPU_QUEUE"] == "gpu"


def test_gpu_worker_reserves_an_nvidia_gpu(compose):
    devices = compose["services"]["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in compose["services"]["airflow-worker"]


def test_init_creates_gpu_pool_and_both_databases(compose):
    init_script = "\n".join(compose["services"]["airflow-init"]["command"])
    assert "airflow db migrate" in init_script
    assert 'airflow pools set "$${FT_GPU_POOL}"' in init_script
    postgres_init = compose["configs"]["postgres-init"]["content"]
    assert "CREATE DATABASE catalog" in postgres_init and "CREATE EXTENSION IF NOT EXISTS vector" in postgres_init
    assert "mc mb" in "\n".join(compose["services"]["minio-init"]["command"])


def test_dockerfile_builds_on_the_locked_airflow_version():
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.2-python3\.11$", dockerfile, re.MULTILINE)
    lock = (PROJECT_ROOT / "uv.lock").read_text()
    assert re.search(r'name = "apache-airflow"\nversion = "3\.3\.2"', lock)
    assert "uv export --frozen" in dockerfile
