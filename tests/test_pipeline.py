"""The pure DAG steps: the cap on mapped tasks, settings for child processes (the gate: test_calibration.py)."""

from __future__ import annotations


import pytest

from fashion_tagging.pipeline import AIRFLOW_MAX_MAP_LENGTH, max_tasks
from fashion_tagging.settings import get_settings


@pytest.mark.parametrize("configured, expected", [(64, 64), (1, 1), (1024, AIRFLOW_MAX_MAP_LENGTH - 1)])
def test_mapped_tasks_stay_under_airflows_map_limit(configured, expected):
    assert max_tasks(get_settings(tagging_max_tasks=configured)) == expected


def test_settings_env_reproduces_the_settings_in_a_child(monkeypatch, tmp_path):
    """DAG tasks (dag.test, Celery workers) rebuild their settings from these variables."""
    from fashion_tagging.pipeline import settings_env
    from fashion_tagging.settings import get_settings

    settings = get_settings(home=tmp_path, image_size=64, baseline_accuracy=0.0, tagging_batch_size=150, tagging_task_min_products=1,
                            database_url="postgresql+psycopg2://u@h/db", object_store_url="s3://b/")
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    assert get_settings().model_dump() == settings.model_dump()
