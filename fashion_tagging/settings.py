"""The one settings module: every tunable of the system, read from ``FT_*`` environment variables.

Defaults are the embedded, no-cloud set-up: a local directory as the object store, an embedded
PostgreSQL (with pgvector) under the state directory, the Kaggle catalog in ``../shared``.
Point ``FT_DATABASE_URL`` / ``FT_OBJECT_STORE_URL`` elsewhere for a real deployment.

Those embedded defaults are the *local* mode only (``FT_MODE``): where Airflow runs a distributed
executor (Celery, Kubernetes, Edge, AWS; :func:`detected_mode`) the mode is ``distributed`` and a
worker without ``FT_DATABASE_URL`` or a shared ``FT_OBJECT_STORE_URL`` refuses to start, naming
what is missing, instead of starting a throw-away PostgreSQL or writing to its own disk.

Values are validated when the settings are built (CLI start, DAG parse, task start): a bad one
raises :class:`SettingsError` with one line per bad variable, e.g.
``FT_IMAGE_SIZE='abc': must be a whole number``. ``python -m fashion_tagging.settings`` prints
the Markdown table of every variable (:func:`settings_table`).
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlparse

import annotated_types
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
FINE_TUNE_MODES = ("none", "top", "full")
# The retrain DAG's image_size param allows the same range.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 600
# Airflow's default [core] max_map_length: mapped tagging tasks per run stay within it.
MAX_MAPPED_TASKS = 1024
ENV_PREFIX = "FT_"
MODES = ("local", "distributed")
# Airflow executors whose tasks run on other machines (a substring of [core] executor, which may be
# a list, an alias or a module path): Celery, Kubernetes (CeleryKubernetes, LocalKubernetes too),
# Edge, and the AWS ECS / Batch / Lambda executors.
DISTRIBUTED_EXECUTORS = ("CeleryExecutor", "KubernetesExecutor", "EdgeExecutor", "EcsExecutor", "BatchExecutor",
                         "LambdaExecutor")


class SettingsError(ValueError):
    """Invalid settings: one line per bad variable, ``FT_NAME='value': what it must be``."""


class Settings(BaseSettings):
    """Resolved configuration; build it with :func:`get_settings` (tests pass overrides).

    Every field ``name`` is read from ``FT_<NAME>``; its ``description`` is the README's meaning.
    Immutable: :meth:`replace` gives a validated copy with some fields changed.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # Where the Kaggle-layout catalog lives (styles.csv, images/, descriptions.csv, split.csv).
    data_dir: Path = Field(
        PROJECT_ROOT.parent / "shared/data/fashion-product-images",
        description="Kaggle-layout catalog folder (styles.csv, images/, descriptions.csv, split.csv).")
    # Local state: embedded Postgres data, local object store, caches, model artifacts.
    home: Path = Field(
        PROJECT_ROOT / ".fashion-tagging",
        description="Local state directory: embedded PostgreSQL data, local object store, caches, model artifacts.")
    # local: the embedded defaults below are allowed; distributed: the catalog database and the
    # object store must be shared services (checked in _shared_services_when_distributed).
    mode: Literal[MODES] = Field(
        "auto", validate_default=True,
        description="local: the embedded PostgreSQL and the FT_HOME/store defaults are allowed (one machine); "
                    "distributed: FT_DATABASE_URL and an s3:// FT_OBJECT_STORE_URL are required, a worker without "
                    "them refuses to start. auto: distributed when Airflow's executor (AIRFLOW__CORE__EXECUTOR, "
                    "else [core] executor of airflow.cfg) is Celery, Kubernetes, Edge or an AWS one, else local.")
    # None -> start the embedded PostgreSQL (with pgvector) under ``home/pgdata`` (local mode only).
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the catalog database (PostgreSQL with pgvector); unset or empty: "
                          "an embedded PostgreSQL under FT_HOME/pgdata (FT_MODE=local only).")
    # file:///path or s3://bucket/prefix (endpoint from ``s3_endpoint_url`` for MinIO/moto).
    object_store_url: str = Field(
        "", description="Object store: file:///dir, a directory path or s3://bucket/prefix; empty: FT_HOME/store "
                          "(FT_MODE=local only).")
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for s3:// stores (MinIO, moto); unset or empty: AWS.")
    catalog_prefix: str = Field("catalog/", description="Store prefix of the catalog manifests.")
    images_prefix: str = Field("images/", description="Store prefix of the product images.")
    models_prefix: str = Field("models/", description="Store prefix of the published model artifacts.")
    s3_max_concurrency: int = Field(16, ge=1, description="Parallel S3 requests of one store client.")

    # Model / training.
    backbone: Literal[BACKBONES] = Field("efficientnet-lite0", description="Pretrained image backbone.")
    image_size: int = Field(224, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE,
                            description="Backbone input size in pixels (square).")
    max_text_tokens: int = Field(100, ge=1, description="Tokens of title + description the text branch reads.")
    vocabulary_size: int = Field(20000, ge=2, description="Text vocabulary size (most frequent training tokens).")
    # Fused-model epochs (early-stopped on val): on the full catalog epochs 13-20 added at most
    # 0.0007 val accuracy for ~74 s each; a cosine schedule over 12 epochs ended lower (0.9612).
    epochs: int = Field(12, ge=1, description="Maximum fused-model training epochs (early-stopped on val).")
    batch_size: int = Field(64, ge=1, description="Training batch size.")
    learning_rate: float = Field(1e-3, gt=0, description="Training learning rate.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed of training and the demo's slices.")
    fine_tune_epochs: int = Field(2, ge=1, description="Epochs of FT_FINE_TUNE=full fine-tuning.")
    # Backbone fine-tuning: "top" trains its last block on cached activations (fits a CPU),
    # "full" trains its top 30 % end to end on pixels (a GPU job), "none" keeps it frozen.
    fine_tune: Literal[FINE_TUNE_MODES] = Field(
        "top", description="Backbone fine-tuning: top = its last block on cached activations (fits a CPU), "
                           "full = its top 30 % end to end on pixels (a GPU job), none = frozen.")
    top_tune_epochs: int = Field(10, ge=1, description="Epochs of FT_FINE_TUNE=top fine-tuning.")
    max_batches_per_epoch: int | None = Field(
        None, ge=1, description="Cap on the batches of every training stage's epoch and validation pass: for "
                                "measuring a retrain's memory at a catalog size whose full epochs take hours. "
                                "Unset (the default) trains on every batch.")
    # Training sees each training photo also as this many augmented views (rotation, crop, mirror,
    # colour, grayscale, JPEG, low resolution: augment.py), embedded once and cached like the photo.
    augmented_views: int = Field(
        1, ge=0, le=4, description="Augmented views per training photo (rotated, cropped, recoloured, recompressed), "
        "embedded once and cached; training samples among them and the photo. 0 = no image augmentation.")
    # Words the model's vocabulary does not know are read as the vocabulary word within this many
    # edits (spelling.py): a typo no longer makes a word unknown. Written into the artifact's config.
    spelling_correction_distance: int = Field(
        1, ge=0, le=2, description="Edits (Damerau) within which an unknown word is corrected to a vocabulary word "
        "before tagging; 0 = no correction.")
    # A class needs this many training products to get its own output; rarer ones are merged
    # into "Other" (per head) so the model never emits a label it could not learn.
    min_class_count: int = Field(
        3, ge=1, description="Training products a class needs to get its own output; rarer classes are "
                             "merged into \"Other\" per head.")

    # Serving / tagging.
    inference_engine: Literal["auto", "keras", "litert"] = Field(
        "auto", description="Where the image backbone runs: litert = its LiteRT export with XNNPACK (for tagging int8 "
                            "when training shipped it; for the feature store's embedding pass the pretrained "
                            "backbone in float32), keras = TensorFlow/Keras (mixed precision on a GPU); auto = keras "
                            "where TensorFlow sees a GPU, else litert.")
    inference_batch_size: int = Field(128, ge=1, description="Batch size of prediction (tagging, evaluation); "
                                                               "a CPU embeds photos for the feature store at most "
                                                               "32 at a time.")
    # Products per transaction of a tagging task (its commit and resume unit). A task pipelines
    # its transactions (reads the next and writes the previous while one is inferred); only its
    # first read and last write stand alone, so a task spans several transactions.
    tagging_batch_size: int = Field(
        250, ge=1, description="Products per transaction of a tagging task (its commit and resume unit).")
    # The smallest range a mapped tagging task takes on: several transactions, so they overlap.
    tagging_task_min_products: int = Field(
        1000, ge=1, description="Smallest range of products one mapped tagging task takes on (a small backlog "
                                "makes fewer, bigger tasks: a task overlaps its transactions' reads, inference "
                                "and writes).")
    # Mapped tagging tasks per DAG run, whatever the catalog size: well under Airflow's
    # [core] max_map_length (1024). A bigger backlog gets bigger tasks, then more runs.
    tagging_max_tasks: int = Field(
        64, ge=1, le=MAX_MAPPED_TASKS,
        description="Mapped tagging tasks per DAG run, whatever the backlog (within Airflow's max_map_length); "
                    "a bigger backlog gets bigger tasks, then more runs.")
    # Products one mapped task may take on (a backfill beyond cap x this spans several runs).
    tagging_task_max_products: int = Field(
        50000, ge=1, description="Products one mapped tagging task may take on (a bigger backfill spans "
                                 "several runs).")
    top_k: int = Field(3, ge=1, description="Most likely labels stored per head, with their scores (the tag's top_k).")

    # Orchestration.
    nightly_cron: str = Field("0 2 * * *", min_length=1, description="Schedule of the catalog_tagging DAG (UTC).")
    retrain_cron: str = Field("0 4 * * 0", min_length=1, description="Schedule of the retrain_tagger DAG (UTC).")
    gpu_queue: str = Field("gpu", min_length=1, description="Celery queue of the GPU tasks.")
    gpu_pool: str = Field("gpu", min_length=1, description="Airflow pool of the GPU tasks.")
    baseline_accuracy: float = Field(
        BASELINE_ACCURACY, ge=0, le=1,
        description="Promotion gate: a candidate needs this articleType test accuracy, and to beat the production "
                    "model significantly on the same test products (FT_GATE_SIGNIFICANCE).")
    gate_significance: float = Field(
        0.05, gt=0, lt=1,
        description="Promotion gate: significance level of the one-sided exact McNemar test (binomial test on the "
                    "test products exactly one of candidate and production gets right) the candidate must pass "
                    "against the production model; ties and noise never promote.")

    # Calibrated confidence and review routing (calibration.py): thresholds chosen on val at training.
    target_precision: float = Field(
        0.99, gt=0, le=1,
        description="articleType tags are auto-accepted above the calibrated confidence at which they reach this "
                    "precision on val (chosen at training); the rest need review.")
    target_precision_other_heads: float = Field(
        0.95, gt=0, le=1,
        description="The same target precision for every other head (subCategory, gender, ...).")

    # Drift of the nightly runs against the training distribution (drift.py).
    drift_threshold: float = Field(
        0.1, gt=0, le=1,
        description="Drift alert: a tagging run whose predicted articleType distribution (top 20 training "
                    "categories + the rest) or articleType confidence histogram is further than this Jensen-Shannon "
                    "divergence (base 2) from the model's training distribution raises an alert (the histogram "
                    "only when its val reference holds at least FT_DRIFT_MIN_PRODUCTS products).")
    drift_min_products: int = Field(
        100, ge=1,
        description="Drift alert: runs that tagged fewer products are measured but never alert (too few to tell "
                    "drift from noise).")
    drift_alert_callback: str = Field(
        "", description="Drift alert hook: `module:function` called with the drift report (a dict) when a run "
                        "alerts, besides the log warning, the page's flag and the drift_alert Asset event; empty: none.")

    @field_validator("mode", mode="before")
    @classmethod
    def _resolve_mode(cls, value):
        """``auto`` (the default) becomes the mode the environment implies: the field holds the decision."""
        return resolve_mode(value)

    @field_validator("database_url", "s3_endpoint_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if value == "" else value

    @field_validator("object_store_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("", "file", "s3") or (parsed.scheme == "s3" and not parsed.netloc):
            raise ValueError("must be file:///dir, a directory path or s3://bucket/prefix")
        return value

    @model_validator(mode="after")
    def _shared_services_when_distributed(self) -> Settings:
        problems = distributed_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def replace(self, **changes) -> Settings:
        """A validated copy with ``changes`` applied (the frozen settings' ``dataclasses.replace``)."""
        return get_settings(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})

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
        """``FT_OBJECT_STORE_URL``, else (local mode only) the directory ``FT_HOME/store``."""
        if not self.object_store_url and resolve_mode(self.mode) != "local":
            raise SettingsError("\n".join(distributed_problems(self)))
        return self.object_store_url or (self.home / "store").resolve().as_uri()


def airflow_executor(environ=None) -> str:
    """Airflow's ``[core] executor`` as a task would see it: the environment, else airflow.cfg ("" if neither).

    Read without importing Airflow: ``AIRFLOW__CORE__EXECUTOR``, else the ``executor`` option of
    ``$AIRFLOW_CONFIG`` (or ``$AIRFLOW_HOME/airflow.cfg``, ``~/airflow/airflow.cfg``).
    """
    environ = os.environ if environ is None else environ
    if environ.get("AIRFLOW__CORE__EXECUTOR"):
        return environ["AIRFLOW__CORE__EXECUTOR"]
    config = environ.get("AIRFLOW_CONFIG") or os.path.join(
        environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow"), "airflow.cfg")
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read(config, encoding="utf-8")
        return parser.get("core", "executor", fallback="")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return ""


def detected_mode(environ=None) -> str:
    """``distributed`` when Airflow's executor runs tasks on other machines, else ``local`` (FT_MODE=auto)."""
    executor = airflow_executor(environ)
    return "distributed" if any(name in executor for name in DISTRIBUTED_EXECUTORS) else "local"


def resolve_mode(value) -> str:
    """An ``FT_MODE`` value as a mode: ``auto`` (or unset) -> :func:`detected_mode`; others as they are."""
    return detected_mode() if value is None or str(value).strip().lower() in ("", "auto") else value


def distributed_problems(settings: Settings) -> list[str]:
    """One line per setting a distributed worker lacks (none in local mode)."""
    store = settings.object_store_url
    if resolve_mode(settings.mode) == "local" or (
            settings.database_url and store and urlparse(store).scheme not in ("", "file")):
        return []
    executor = airflow_executor()
    why = (f"a distributed worker (FT_MODE=distributed"
           f"{f', AIRFLOW__CORE__EXECUTOR={executor}' if detected_mode() == 'distributed' else ''}) must share the "
           f"catalog database and the object store with the other workers")
    local = "or FT_MODE=local if every task runs on this one machine"
    problems = []
    if not settings.database_url:
        problems.append(f"{env_name('database_url')} is unset: {why}; set "
                        f"{env_name('database_url')}=postgresql+psycopg2://user:password@host:5432/catalog, {local}")
    if not store:
        problems.append(f"{env_name('object_store_url')} is unset: {why}; set "
                        f"{env_name('object_store_url')}=s3://bucket/prefix, {local}")
    elif urlparse(store).scheme in ("", "file"):
        problems.append(f"{env_name('object_store_url')}={store!r}: {why}, and a file:// store is this machine's "
                        f"disk; set {env_name('object_store_url')}=s3://bucket/prefix "
                        f"({env_name('s3_endpoint_url')} for MinIO), {local}")
    return problems


def env_name(field: str) -> str:
    """The environment variable of a settings field: ``image_size`` -> ``FT_IMAGE_SIZE``."""
    return f"{ENV_PREFIX}{field.upper()}"


def get_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (used by tests and the CLI).

    Overrides are validated like the environment; raises :class:`SettingsError` naming every bad value.
    """
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = _describe(error, overrides)
    # Raised outside the except block: no chained pydantic report to bury the one line per problem
    # (a DAG file's import error, as Airflow records it, is a short traceback ending in that line).
    raise SettingsError(problems)


def _describe(error: ValidationError, overrides: dict) -> str:
    """One line per bad value: ``FT_NAME='value': problem`` (``name=value: problem`` for an override)."""
    lines = []
    for problem in error.errors(include_url=False):
        if not problem["loc"]:  # a whole-settings check (a distributed worker's services): its own lines
            lines.extend(str((problem.get("ctx") or {}).get("error", problem["msg"])).splitlines())
            continue
        field = str(problem["loc"][0])
        name = field if field in overrides else env_name(field)
        lines.append(f"{name}={problem.get('input')!r}: {_problem_text(field, problem)}")
    return "\n".join(dict.fromkeys(lines))


def _problem_text(field: str, problem: dict) -> str:
    kind, ctx = problem["type"], problem.get("ctx") or {}
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "must be a number"
    if kind == "literal_error":
        choices = get_args(Settings.model_fields[field].annotation)
        return "must be one of " + ", ".join(("auto", *choices) if field == "mode" else choices)
    bounds = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
              "greater_than": ("greater than", "gt"), "less_than": ("less than", "lt")}
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx[key]}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "extra_forbidden":
        return "is not a setting"
    if kind == "value_error":
        return str(ctx.get("error", problem["msg"]))
    message = problem["msg"]
    return message[:1].lower() + message[1:]


def settings_table() -> str:
    """A Markdown table of every ``FT_*`` setting: variable, default, meaning (with its allowed values)."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for field, info in Settings.model_fields.items():
        rows.append(f"| `{env_name(field)}` | {_default_text(info.default)} | {_meaning_text(info)} |")
    return "\n".join(rows)


def _default_text(value) -> str:
    if value is None or value == "":
        return "*(unset)*"
    if isinstance(value, Path):
        value = "<project>/" + os.path.relpath(value, PROJECT_ROOT)
    return f"`{value}`"


def _meaning_text(info) -> str:
    meaning = info.description or ""
    choices = get_args(info.annotation) if getattr(info.annotation, "__origin__", None) is Literal else ()
    limits = []
    if choices:
        limits.append("one of " + ", ".join(f"`{choice}`" for choice in choices))
    words = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("≤", "le"),
             annotated_types.Lt: ("<", "lt")}
    for constraint in info.metadata:
        if type(constraint) in words:
            symbol, attribute = words[type(constraint)]
            limits.append(f"{symbol} {getattr(constraint, attribute)}")
    if limits:
        meaning += f" ({', '.join(limits)})"
    return meaning.replace("|", "\\|")


if __name__ == "__main__":
    print(settings_table())
