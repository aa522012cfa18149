"""The CLI serves the registry: predict/models/status read the catalog database's model registry.

Real parts: the test PostgreSQL (a fresh database), a local-directory object store, the session's
tiny trained artifact.
"""

from __future__ import annotations

import json
import shutil

import pytest

from fashion_tagging.cli import main
from fashion_tagging.db import repository


@pytest.fixture
def cli_env(catalog_db_url, tmp_path, monkeypatch):
    """A state directory and database of its own; ``run(*argv)`` -> (exit status, stdout, stderr)."""
    home = tmp_path / "home"
    monkeypatch.setenv("FT_DATABASE_URL", catalog_db_url)
    monkeypatch.setenv("FT_OBJECT_STORE_URL", (tmp_path / "store").as_uri())
    return home


def run(capsys, *argv):
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_predict_without_a_registered_model_says_what_to_do(cli_env, capsys):
    status, _, err = run(capsys, "predict", "--home", str(cli_env), "--text", "Nike Men Blue Running Shoes")
    assert status == 2
    assert "no production model in the registry" in err
    assert "Traceback" not in err


def test_predict_and_models_use_the_registry_not_the_newest_local_directory(cli_env, tiny_artifact, catalog_engine,
                                                                             capsys):
    models = cli_env / "models"
    served = shutil.copytree(tiny_artifact, models / tiny_artifact.name)
    # A newer local candidate that the registry never promoted (e.g. a rejected retrain).
    candidate = shutil.copytree(tiny_artifact, models / "29991231T000000-efficientnet-lite0")
    repository.register_model(catalog_engine, served.name, "efficientnet-lite0", 64, False, served.as_uri(), {}, 0.5)
    repository.promote_model(catalog_engine, served.name)

    status, out, err = run(capsys, "predict", "--home", str(cli_env), "--text", "Nike Men Blue Running Shoes")
    assert status == 0
    assert err.strip() == f"model {served.name}"
    tags = json.loads(out.splitlines()[0])
    assert "articleType" in tags and 0.0 <= tags["articleType"]["confidence"] <= 1.0

    status, _, err = run(capsys, "predict", "--home", str(cli_env), "--version", candidate.name, "--text", "shoes")
    assert status == 0 and err.strip() == f"model {candidate.name}"

    status, out, _ = run(capsys, "models", "--home", str(cli_env))
    assert status == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "promoted" in lines[served.name]
    assert "local" in lines[candidate.name] and "not in the registry" in lines[candidate.name]


def test_status_reports_database_store_model_and_runs(cli_env, tiny_artifact, catalog_engine, capsys):
    status, out, _ = run(capsys, "status", "--home", str(cli_env))
    assert status == 0
    assert "catalog database: postgresql" in out
    assert "object store:" in out and "UNREACHABLE" not in out
    assert "serving model:    none yet" in out
    assert "last tagging runs: none" in out

    repository.register_model(catalog_engine, "v1", "efficientnet-lite0", 64, False, tiny_artifact.as_uri(), {}, 0.5)
    repository.promote_model(catalog_engine, "v1")
    status, out, _ = run(capsys, "status", "--home", str(cli_env))
    assert "promoted model:   v1 tagging the catalog" in out


def test_db_stop_with_an_external_database_is_a_clear_error(cli_env, capsys):
    status, _, err = run(capsys, "db", "stop", "--home", str(cli_env))
    assert status == 2
    assert "FT_DATABASE_URL points at an external database" in err
