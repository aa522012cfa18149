"""The pure DAG steps: the cap on mapped tasks, the promotion gate, settings for child processes."""

from __future__ import annotations


import pytest

from fashion_tagging.pipeline import AIRFLOW_MAX_MAP_LENGTH, gate, max_tasks
from fashion_tagging.settings import get_settings


@pytest.mark.parametrize("configured, expected", [(64, 64), (1, 1), (1024, AIRFLOW_MAX_MAP_LENGTH - 1)])
def test_mapped_tasks_stay_under_airflows_map_limit(configured, expected):
    assert max_tasks(get_settings(tagging_max_tasks=configured)) == expected


def test_gate_rejects_below_baseline_even_without_production():
    decision = gate({"version": "c", "article_type_accuracy": 0.905}, None, 0.91)
    assert decision["promote"] is False and "below the baseline" in decision["reason"]
    assert decision["candidate_accuracy"] == 0.905 and decision["production_accuracy"] is None


def test_gate_rejects_a_candidate_worse_than_production():
    decision = gate({"version": "c", "article_type_accuracy": 0.93}, {"version": "p", "article_type_accuracy": 0.94},
                    0.91)
    assert decision["promote"] is False and "worse than production p" in decision["reason"]


@pytest.mark.parametrize("production", [None, {"version": "p", "article_type_accuracy": 0.93}])
def test_gate_promotes_at_or_above_baseline_and_production(production):
    decision = gate({"version": "c", "article_type_accuracy": 0.93}, production, 0.91)
    assert decision["promote"] is True and decision["baseline"] == 0.91


def test_settings_env_reproduces_the_settings_in_a_child(monkeypatch, tmp_path):
    """DAG tasks (dag.test, Celery workers) rebuild their settings from these variables."""
    from fashion_tagging.pipeline import settings_env
    from fashion_tagging.settings import get_settings

    settings = get_settings(home=tmp_path, image_size=64, baseline_accuracy=0.0, tagging_batch_size=150,
                            database_url="postgresql+psycopg2://u@h/db", object_store_url="s3://b/")
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    assert get_settings().model_dump() == settings.model_dump()
