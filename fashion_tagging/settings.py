"""The one settings module: every tunable of the system, read from ``FT_*`` environment variables.

Defaults are the embedded, no-cloud set-up: a local directory as the object store, an embedded
PostgreSQL (with pgvector) under the state directory, the Kaggle catalog in ``../shared``.
Point ``FT_DATABASE_URL`` / ``FT_OBJECT_STORE_URL`` elsewhere for a real deployment.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Model constants from the research the project starts from.
BASELINE_ACCURACY = 0.91
PRIMARY_HEAD = "articleType"
# The label columns a catalog MAY have (candidate heads). A trained model has only those its
# training labels support (``train.fit_heads``; the artifact's config.json "heads" and
# "heads_left_out"): tagging and evaluation use the artifact's heads, never this tuple.
HEADS = ("articleType", "subCategory", "masterCategory", "gender", "baseColour", "season", "usage")
IMAGE_EMBEDDING_DIM = 1280
PRODUCT_EMBEDDING_DIM = 256
BACKBONES = ("efficientnet-lite0", "efficientnet-b0")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"FT_{name}", default)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved configuration; build it with :func:`get_settings` (tests pass overrides)."""

    # Where the Kaggle-layout catalog lives (styles.csv, images/, descriptions.csv, split.csv).
    data_dir: Path = dataclasses.field(default_factory=lambda: Path(_env("DATA_DIR", str(PROJECT_ROOT.parent / "shared/data/fashion-product-images"))))
    # Local state: embedded Postgres data, local object store, caches, model artifacts.
    home: Path = dataclasses.field(default_factory=lambda: Path(_env("HOME", str(PROJECT_ROOT / ".fashion-tagging"))))
    # None -> start the embedded PostgreSQL (with pgvector) under ``home/pgdata``.
    database_url: str | None = dataclasses.field(default_factory=lambda: os.environ.get("FT_DATABASE_URL") or None)
    # file:///path or s3://bucket/prefix (endpoint from ``s3_endpoint_url`` for MinIO/moto).
    object_store_url: str = dataclasses.field(default_factory=lambda: _env("OBJECT_STORE_URL", ""))
    s3_endpoint_url: str | None = dataclasses.field(default_factory=lambda: os.environ.get("FT_S3_ENDPOINT_URL") or None)
    catalog_prefix: str = dataclasses.field(default_factory=lambda: _env("CATALOG_PREFIX", "catalog/"))
    images_prefix: str = dataclasses.field(default_factory=lambda: _env("IMAGES_PREFIX", "images/"))
    models_prefix: str = dataclasses.field(default_factory=lambda: _env("MODELS_PREFIX", "models/"))
    s3_max_concurrency: int = dataclasses.field(default_factory=lambda: int(_env("S3_MAX_CONCURRENCY", "16")))

    # Model / training.
    backbone: str = dataclasses.field(default_factory=lambda: _env("BACKBONE", "efficientnet-lite0"))
    image_size: int = dataclasses.field(default_factory=lambda: int(_env("IMAGE_SIZE", "224")))
    max_text_tokens: int = dataclasses.field(default_factory=lambda: int(_env("MAX_TEXT_TOKENS", "100")))
    vocabulary_size: int = dataclasses.field(default_factory=lambda: int(_env("VOCABULARY_SIZE", "20000")))
    # Fused-model epochs (early-stopped on val): on the full catalog epochs 13-20 added at most
    # 0.0007 val accuracy for ~74 s each; a cosine schedule over 12 epochs ended lower (0.9612).
    epochs: int = dataclasses.field(default_factory=lambda: int(_env("EPOCHS", "12")))
    batch_size: int = dataclasses.field(default_factory=lambda: int(_env("BATCH_SIZE", "64")))
    learning_rate: float = dataclasses.field(default_factory=lambda: float(_env("LEARNING_RATE", "1e-3")))
    seed: int = dataclasses.field(default_factory=lambda: int(_env("SEED", "42")))
    fine_tune_epochs: int = dataclasses.field(default_factory=lambda: int(_env("FINE_TUNE_EPOCHS", "2")))
    # Backbone fine-tuning: "top" trains its last block on cached activations (fits a CPU),
    # "full" trains its top 30 % end to end on pixels (a GPU job), "none" keeps it frozen.
    fine_tune: str = dataclasses.field(default_factory=lambda: _env("FINE_TUNE", "top"))
    top_tune_epochs: int = dataclasses.field(default_factory=lambda: int(_env("TOP_TUNE_EPOCHS", "10")))
    # A class needs this many training products to get its own output; rarer ones are merged
    # into "Other" (per head) so the model never emits a label it could not learn.
    min_class_count: int = dataclasses.field(default_factory=lambda: int(_env("MIN_CLASS_COUNT", "3")))

    # Serving / tagging.
    inference_batch_size: int = dataclasses.field(default_factory=lambda: int(_env("INFERENCE_BATCH_SIZE", "128")))
    # Products per transaction of a tagging task (its commit and resume unit).
    tagging_batch_size: int = dataclasses.field(default_factory=lambda: int(_env("TAGGING_BATCH_SIZE", "1000")))
    # Mapped tagging tasks per DAG run, whatever the catalog size: well under Airflow's
    # [core] max_map_length (1024). A bigger backlog gets bigger tasks, then more runs.
    tagging_max_tasks: int = dataclasses.field(default_factory=lambda: int(_env("TAGGING_MAX_TASKS", "64")))
    # Products one mapped task may take on (a backfill beyond cap x this spans several runs).
    tagging_task_max_products: int = dataclasses.field(
        default_factory=lambda: int(_env("TAGGING_TASK_MAX_PRODUCTS", "50000")))
    top_k: int = dataclasses.field(default_factory=lambda: int(_env("TOP_K", "3")))

    # Orchestration.
    nightly_cron: str = dataclasses.field(default_factory=lambda: _env("NIGHTLY_CRON", "0 2 * * *"))
    retrain_cron: str = dataclasses.field(default_factory=lambda: _env("RETRAIN_CRON", "0 4 * * 0"))
    gpu_queue: str = dataclasses.field(default_factory=lambda: _env("GPU_QUEUE", "gpu"))
    gpu_pool: str = dataclasses.field(default_factory=lambda: _env("GPU_POOL", "gpu"))
    baseline_accuracy: float = dataclasses.field(default_factory=lambda: float(_env("BASELINE_ACCURACY", str(BASELINE_ACCURACY))))

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "models"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def pgdata_dir(self) -> Path:
        return self.home / "pgdata"

    @property
    def resolved_object_store_url(self) -> str:
        return self.object_store_url or (self.home / "store").resolve().as_uri()


def get_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (used by tests and the CLI)."""
    return dataclasses.replace(Settings(), **overrides) if overrides else Settings()
