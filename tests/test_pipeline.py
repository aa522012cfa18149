"""The pure DAG steps: batch planning, the promotion gate, run summaries."""

from __future__ import annotations

import datetime as dt

import pytest

from fashion_tagging.pipeline import MAX_BATCH_SIZE, MIN_BATCH_SIZE, gate, plan_batches, summarize_run


def test_plan_batches_covers_every_id_once_in_even_batches():
    batches = plan_batches([5, 3, 3, *range(10, 2510)], 1000)
    flat = [i for batch in batches for i in batch]
    assert flat == sorted(set(flat)) and len(flat) == 2502
    assert len(batches) == 3 and max(map(len, batches)) - min(map(len, batches)) <= 1


@pytest.mark.parametrize("requested, expected", [(1, MIN_BATCH_SIZE), (10**6, MAX_BATCH_SIZE)])
def test_plan_batches_never_tiny_nor_huge(requested, expected):
    batches = plan_batches(list(range(20000)), requested)
    assert max(map(len, batches)) == expected


def test_plan_batches_of_nothing_is_no_batch():
    assert plan_batches([], 1000) == []


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


def test_summarize_run_totals_and_throughput():
    started = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=10)).isoformat()
    batch = {"model_version": "v1", "requested": 100, "tagged": 98, "text_only": 3, "errors": 4, "total_seconds": 2.0}
    summary = summarize_run("run-1", [batch, {**batch, "tagged": 100, "errors": 0}, None], started_at=started)
    assert summary["batches"] == 2 and summary["products_seen"] == 200 and summary["products_tagged"] == 198
    assert summary["errors"] == 4 and summary["model_version"] == "v1"
    assert summary["seconds"] >= 10 and 0 < summary["products_per_second"] < 198 / 10 + 1
    assert summary["products_per_batch_second"] == 49.5


def test_settings_env_reproduces_the_settings_in_a_child(monkeypatch, tmp_path):
    """DAG tasks (dag.test, Celery workers) rebuild their settings from these variables."""
    import dataclasses

    from fashion_tagging.pipeline import settings_env
    from fashion_tagging.settings import get_settings

    settings = get_settings(home=tmp_path, image_size=64, baseline_accuracy=0.0, tagging_batch_size=150,
                            database_url="postgresql+psycopg2://u@h/db", object_store_url="s3://b/")
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    assert dataclasses.asdict(get_settings()) == dataclasses.asdict(settings)
