"""FT_MODE: the embedded defaults are local mode's; a distributed worker without shared services fails loudly.

``auto`` (the default) is ``distributed`` when Airflow's executor runs tasks on other machines
(AIRFLOW__CORE__EXECUTOR, else airflow.cfg), else ``local``. A distributed worker needs
FT_DATABASE_URL and a shared (s3://) FT_OBJECT_STORE_URL: without them the settings are refused
with one line per variable, and get_engine never starts an embedded PostgreSQL.
"""

from __future__ import annotations

import pytest
import yaml

from fashion_tagging.db import engine as db_engine
from fashion_tagging.settings import PROJECT_ROOT, Settings, SettingsError, detected_mode, get_settings

DB_URL = "postgresql+psycopg2://tagger:secret@catalog-db:5432/catalog"
STORE_URL = "s3://fashion-catalog/prod"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-worker-gpu", "airflow-init")


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No FT_* setting and no Airflow executor from the caller's environment (nor an airflow.cfg)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"FT_{name.upper()}", raising=False)
    monkeypatch.delenv("AIRFLOW__CORE__EXECUTOR", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.delenv("AIRFLOW_CONFIG", raising=False)
    monkeypatch.setenv("FT_HOME", str(tmp_path / "home"))
    return monkeypatch


def test_local_by_default(env):
    settings = get_settings()
    assert settings.mode == "local" and settings.database_url is None
    assert settings.resolved_object_store_url.startswith("file://")  # the embedded defaults are allowed


@pytest.mark.parametrize("executor", [
    "CeleryExecutor", "KubernetesExecutor", "CeleryKubernetesExecutor", "EdgeExecutor",
    "airflow.providers.celery.executors.celery_executor.CeleryExecutor", "LocalExecutor,CeleryExecutor",
    "airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor"])
def test_a_distributed_executor_means_distributed(env, executor):
    env.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    assert detected_mode() == "distributed"
    assert get_settings(database_url=DB_URL, object_store_url=STORE_URL).mode == "distributed"


@pytest.mark.parametrize("executor", ["LocalExecutor", "SequentialExecutor", ""])
def test_a_local_executor_means_local(env, executor):
    env.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    assert detected_mode() == "local" and get_settings().mode == "local"


def test_the_executor_of_airflow_cfg_counts_too(env, tmp_path):
    (tmp_path / "airflow").mkdir()
    (tmp_path / "airflow" / "airflow.cfg").write_text("[core]\nexecutor = CeleryExecutor\ndags_folder = %(x)s\n")
    assert detected_mode() == "distributed"
    with pytest.raises(SettingsError):
        get_settings()
    env.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")  # the environment wins, as in Airflow
    assert get_settings().mode == "local"


def test_a_distributed_worker_without_urls_is_refused_with_one_line_per_variable(env):
    env.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    with pytest.raises(SettingsError) as raised:
        get_settings()
    lines = str(raised.value).splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["FT_DATABASE_URL", "FT_OBJECT_STORE_URL"]
    for line in lines:
        assert "is unset: a distributed worker (FT_MODE=distributed, AIRFLOW__CORE__EXECUTOR=CeleryExecutor) " \
               "must share the catalog database and the object store with the other workers" in line
        assert line.endswith("or FT_MODE=local if every task runs on this one machine")
    assert "set FT_DATABASE_URL=postgresql+psycopg2://" in lines[0] and "set FT_OBJECT_STORE_URL=s3://" in lines[1]
    assert raised.value.__context__ is None  # no chained pydantic report

    env.setenv("FT_DATABASE_URL", DB_URL)  # one of the two: one line
    with pytest.raises(SettingsError, match=r"^FT_OBJECT_STORE_URL is unset: [^\n]*$"):
        get_settings()


def test_a_file_store_is_not_shared(env, tmp_path):
    env.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    env.setenv("FT_DATABASE_URL", DB_URL)
    for store in ((tmp_path / "store").as_uri(), str(tmp_path / "store")):
        env.setenv("FT_OBJECT_STORE_URL", store)
        with pytest.raises(SettingsError) as raised:
            get_settings()
        assert str(raised.value).startswith(f"FT_OBJECT_STORE_URL={store!r}: a distributed worker")
        assert "a file:// store is this machine's disk" in str(raised.value)


def test_with_shared_services_a_distributed_worker_starts(env):
    env.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    env.setenv("FT_DATABASE_URL", DB_URL)
    env.setenv("FT_OBJECT_STORE_URL", STORE_URL)
    settings = get_settings()
    assert (settings.mode, settings.database_url, settings.resolved_object_store_url) == \
        ("distributed", DB_URL, STORE_URL)
    assert settings.replace(image_size=64).mode == "distributed"


def test_explicit_modes_win_over_the_executor(env):
    env.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    env.setenv("FT_MODE", "local")  # every task on this one machine: the embedded defaults are allowed
    assert get_settings().mode == "local"
    env.delenv("AIRFLOW__CORE__EXECUTOR")
    env.setenv("FT_MODE", "distributed")  # no distributed executor, yet declared distributed
    with pytest.raises(SettingsError, match=r"^FT_DATABASE_URL is unset: a distributed worker \(FT_MODE=distributed\)"):
        get_settings()
    env.setenv("FT_MODE", "cluster")
    with pytest.raises(SettingsError, match=r"^FT_MODE='cluster': must be one of auto, local, distributed$"):
        get_settings()
    env.setenv("FT_MODE", "auto")
    assert get_settings().mode == "local"


def test_get_engine_never_starts_an_embedded_server_in_distributed_mode(env, tmp_path, monkeypatch):
    """Defence in depth: settings that slipped past validation still do not get a private PostgreSQL."""
    started = []
    monkeypatch.setattr(db_engine, "embedded_postgres_url", lambda *args, **kwargs: started.append(args))
    distributed = get_settings().model_copy(update={"mode": "distributed"})  # a copy is not validated
    with pytest.raises(SettingsError, match=r"^FT_DATABASE_URL is unset: a distributed worker"):
        db_engine.get_engine(distributed)
    with pytest.raises(SettingsError, match=r"FT_OBJECT_STORE_URL is unset"):
        distributed.resolved_object_store_url  # noqa: B018 (no local-directory store either)
    assert started == [] and not (tmp_path / "home").exists()


def test_the_cli_prints_the_lines_and_exits_2(env, capsys):
    from fashion_tagging.cli import main

    env.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "FT_DATABASE_URL is unset" in err[0] and "FT_OBJECT_STORE_URL is unset" in err[1]


def test_a_dag_file_on_a_worker_without_urls_fails_to_import_naming_them(env, tmp_path):
    from tests.dag_probe import probe_in_subprocess

    env.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    probe = probe_in_subprocess(PROJECT_ROOT / "dags" / "catalog_tagging.py", str(tmp_path / "airflow"))
    assert probe["dags"] == {} and list(probe["import_errors"]) == ["catalog_tagging.py"]
    error = probe["import_errors"]["catalog_tagging.py"]
    assert "SettingsError: FT_DATABASE_URL is unset: a distributed worker" in error
    assert "FT_OBJECT_STORE_URL is unset" in error.strip().splitlines()[-1]


def test_every_compose_service_is_a_distributed_worker_with_its_services(env):
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yaml").read_text())
    for name in AIRFLOW_SERVICES:
        service_env = compose["services"][name]["environment"]
        assert service_env["FT_MODE"] == "distributed", name
        for key, value in service_env.items():
            if key.startswith(("FT_", "AIRFLOW__CORE__EXECUTOR")):
                env.setenv(key, str(value))
        settings = get_settings()
        assert settings.mode == "distributed" and settings.database_url.endswith("@postgres/catalog"), name
        assert settings.resolved_object_store_url.startswith("s3://") and settings.s3_endpoint_url, name
        for key in service_env:
            if key.startswith("FT_"):
                env.delenv(key)


def test_the_local_airflow_of_make_demo_stays_local(env):
    from fashion_tagging.pipeline import local_airflow_env

    settings = get_settings()
    child = local_airflow_env(settings)
    assert child["FT_MODE"] == "local" and "AIRFLOW__CORE__EXECUTOR" not in child
