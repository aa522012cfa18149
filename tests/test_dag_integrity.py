"""Every DAG file parses without errors, cheaply, and declares ownership, tags and retries.

Each file is parsed in a fresh process (like the dag-processor), by ``tests/dag_probe.py``, so
Airflow's global configuration never leaks into the rest of the test session.
"""

from __future__ import annotations

import pytest

from fashion_tagging.settings import PROJECT_ROOT
from tests.dag_probe import dag_files, probe_in_subprocess

EXPECTED_DAGS = {"catalog_tagging.py": {"catalog_tagging"}, "retrain.py": {"retrain_tagger"}}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict:
    airflow_home = str(tmp_path_factory.mktemp("airflow-home"))
    return {f.name: probe_in_subprocess(f, airflow_home) for f in dag_files()}


def test_expected_dag_files_define_their_dags(probes):
    assert {name: set(p["dags"]) for name, p in probes.items()} == EXPECTED_DAGS


def test_no_import_errors(probes):
    assert {name: p["import_errors"] for name, p in probes.items() if p["import_errors"]} == {}


def test_dag_files_import_nothing_heavy_at_module_level(probes):
    for name, probe in probes.items():
        assert probe["heavy_modules"] == [], name
        # Only the light modules of the package: settings and the Airflow-free step names.
        assert set(probe["fashion_tagging_modules"]) <= {"fashion_tagging", "fashion_tagging.settings",
                                                         "fashion_tagging.pipeline"}, name


def test_every_dag_has_tags_owner_and_retries(probes):
    for probe in probes.values():
        for dag_id, dag in probe["dags"].items():
            assert dag["tags"], dag_id
            assert dag["owners"] and "airflow" not in dag["owners"], dag_id
            assert all(retries >= 1 for retries in dag["retries"].values()), (dag_id, dag["retries"])


def test_pipeline_module_stays_free_of_airflow_and_heavy_imports():
    """The DAG files import it at parse time, so its module level must stay light."""
    import subprocess
    import sys

    code = ("import sys, fashion_tagging.pipeline; "
            "print(sorted(m for m in ('airflow', 'tensorflow', 'pandas', 'sqlalchemy', 'numpy') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=PROJECT_ROOT)
    assert completed.stdout.strip() == "[]"
