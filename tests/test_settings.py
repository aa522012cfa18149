"""Settings are validated when built: a bad ``FT_*`` value is one clear line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from fashion_tagging.settings import PROJECT_ROOT, Settings, SettingsError, get_settings, settings_table

# The defaults as they were before validation came in (the dataclass's default factories).
DEFAULTS = {
    "data_dir": PROJECT_ROOT.parent / "shared/data/fashion-product-images",
    "home": PROJECT_ROOT / ".fashion-tagging", "mode": "local",  # FT_MODE=auto outside a distributed executor
    "database_url": None, "object_store_url": "", "s3_endpoint_url": None,
    "catalog_prefix": "catalog/", "images_prefix": "images/", "models_prefix": "models/", "s3_max_concurrency": 16,
    "backbone": "efficientnet-lite0", "image_size": 224, "max_text_tokens": 100, "vocabulary_size": 20000,
    "epochs": 12, "batch_size": 64, "learning_rate": 1e-3, "seed": 42, "fine_tune_epochs": 2, "fine_tune": "top",
    "top_tune_epochs": 10, "max_batches_per_epoch": None, "augmented_views": 1, "spelling_correction_distance": 1,
    "min_class_count": 3,
    "inference_engine": "auto", "inference_batch_size": 128, "tagging_batch_size": 250, "tagging_task_min_products": 1000, "tagging_max_tasks": 64,
    "tagging_task_max_products": 50000, "top_k": 3,
    "nightly_cron": "0 2 * * *", "retrain_cron": "0 4 * * 0", "gpu_queue": "gpu", "gpu_pool": "gpu",
    "baseline_accuracy": 0.91,
    "gate_significance": 0.05, "target_precision": 0.99, "target_precision_other_heads": 0.95,
    "drift_threshold": 0.1, "drift_min_products": 100, "drift_alert_callback": "",
}


@pytest.fixture
def clean_env(monkeypatch):
    """No ``FT_*`` setting from the caller's environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"FT_{name.upper()}", raising=False)
    monkeypatch.delenv("AIRFLOW__CORE__EXECUTOR", raising=False)  # FT_MODE=auto: local
    return monkeypatch


def test_defaults_unchanged(clean_env):
    settings = get_settings()
    assert settings.model_dump() == DEFAULTS
    assert settings.artifacts_dir == DEFAULTS["home"] / "models"
    assert settings.resolved_object_store_url == (DEFAULTS["home"] / "store").resolve().as_uri()


def test_values_come_from_ft_variables(clean_env):
    clean_env.setenv("FT_IMAGE_SIZE", "64")
    clean_env.setenv("FT_HOME", "/tmp/somewhere")
    clean_env.setenv("FT_LEARNING_RATE", "3e-4")
    clean_env.setenv("FT_BACKBONE", "efficientnet-b0")
    settings = get_settings()
    assert (settings.image_size, settings.home, settings.learning_rate, settings.backbone) == \
        (64, Path("/tmp/somewhere"), 3e-4, "efficientnet-b0")


@pytest.mark.parametrize("name", ["FT_DATABASE_URL", "FT_S3_ENDPOINT_URL"])
def test_empty_optional_url_means_unset(clean_env, name):
    clean_env.setenv(name, "")
    assert getattr(get_settings(), name[3:].lower()) is None


@pytest.mark.parametrize("name, value, problem", [
    ("FT_IMAGE_SIZE", "abc", "must be a whole number"),
    ("FT_IMAGE_SIZE", "8", "must be at least 32"),
    ("FT_BACKBONE", "resnet", "must be one of efficientnet-lite0, efficientnet-b0"),
    ("FT_FINE_TUNE", "bogus", "must be one of none, top, full"),
    ("FT_LEARNING_RATE", "fast", "must be a number"),
    ("FT_BATCH_SIZE", "0", "must be at least 1"),
    ("FT_TAGGING_MAX_TASKS", "5000", "must be at most 1024"),
    ("FT_OBJECT_STORE_URL", "http://bucket", "must be file:///dir, a directory path or s3://bucket/prefix"),
])
def test_a_bad_variable_is_one_line_naming_it(clean_env, name, value, problem):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        get_settings()
    assert str(raised.value) == f"{name}={value!r}: {problem}"
    assert isinstance(raised.value, ValueError)  # the CLI's one-line error path catches ValueError
    assert raised.value.__cause__ is None and raised.value.__suppress_context__ is False
    assert raised.value.__context__ is None  # no chained pydantic report


def test_several_bad_variables_one_line_each(clean_env):
    clean_env.setenv("FT_IMAGE_SIZE", "abc")
    clean_env.setenv("FT_FINE_TUNE", "bogus")
    with pytest.raises(SettingsError) as raised:
        get_settings()
    assert str(raised.value).splitlines() == ["FT_IMAGE_SIZE='abc': must be a whole number",
                                              "FT_FINE_TUNE='bogus': must be one of none, top, full"]


def test_overrides_are_validated_and_win_over_the_environment(clean_env):
    clean_env.setenv("FT_DATABASE_URL", "postgresql+psycopg2://u@h/db")
    clean_env.setenv("FT_IMAGE_SIZE", "96")
    assert get_settings(database_url=None, image_size=64).database_url is None
    assert get_settings(image_size=64).image_size == 64
    with pytest.raises(SettingsError, match=r"^image_size=10: must be at least 32$"):
        get_settings(image_size=10)
    with pytest.raises(SettingsError, match=r"^backbone='resnet': must be one of"):
        get_settings(backbone="resnet")
    with pytest.raises(SettingsError, match=r"^imagesize=64: is not a setting$"):
        get_settings(imagesize=64)


def test_replace_is_a_validated_copy(clean_env, tmp_path):
    settings = get_settings(home=tmp_path)
    changed = settings.replace(baseline_accuracy=0.0, fine_tune="none")
    assert (changed.baseline_accuracy, changed.fine_tune, changed.home) == (0.0, "none", tmp_path)
    assert settings.baseline_accuracy == 0.91  # the original is untouched (and frozen)
    with pytest.raises(ValueError):
        settings.epochs = 3
    with pytest.raises(SettingsError, match=r"^fine_tune='partly': must be one of none, top, full$"):
        settings.replace(fine_tune="partly")


def test_every_setting_has_a_description_and_a_table_row():
    assert [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()] == []
    rows = settings_table().splitlines()[2:]
    assert [row.split("|")[1].strip(" `") for row in rows] == [f"FT_{name.upper()}" for name in Settings.model_fields]
    assert "| `FT_IMAGE_SIZE` | `224` |" in settings_table() and "≥ 32, ≤ 600" in settings_table()
    assert all(row.count(" | ") == 2 for row in rows)  # no stray pipe from a description


def test_cli_prints_the_line_and_exits_2(clean_env, capsys):
    from fashion_tagging.cli import main

    clean_env.setenv("FT_IMAGE_SIZE", "abc")
    assert main(["models"]) == 2
    assert capsys.readouterr().err.strip() == "fashion-tagging models: error: FT_IMAGE_SIZE='abc': must be a whole number"


def test_dag_import_error_ends_with_the_line(clean_env, tmp_path):
    """The dag-processor records the file's import error: a short traceback ending in that one line."""
    from tests.dag_probe import probe_in_subprocess

    clean_env.setenv("FT_IMAGE_SIZE", "abc")
    probe = probe_in_subprocess(PROJECT_ROOT / "dags" / "retrain.py", str(tmp_path))
    assert probe["dags"] == {} and list(probe["import_errors"]) == ["retrain.py"]
    error = probe["import_errors"]["retrain.py"]
    assert error.strip().splitlines()[-1] == \
        "fashion_tagging.settings.SettingsError: FT_IMAGE_SIZE='abc': must be a whole number"
    assert "pydantic" not in error and "validation error" not in error.lower()


def test_the_readme_lists_every_setting_as_settings_table_prints_it():
    """The README's settings table is `python -m fashion_tagging.settings`' output, kept in step."""
    assert settings_table().rstrip("\n") in (PROJECT_ROOT / "README.md").read_text()
