"""Retrain the tagger, evaluate it on the fixed test split, and promote it only if it passes the gate.

Weekly on ``FT_RETRAIN_CRON``, or triggered by hand with params (backbone, epochs, fine_tune,
image_size). The gate: articleType test accuracy >= the 0.91 baseline AND, when a model is in
production, significantly better than it on the same test products (both are scored in the
evaluate task; one-sided exact McNemar test at FT_GATE_SIGNIFICANCE): ties and noise never
promote. The decision, with both accuracies, the discordant pairs and the p-value, goes to the task
log and the registry (model_versions.metrics -> 'gate', gate_reason). A rejected candidate is registered as ``rejected`` with the reason, production is
left untouched and the "model promoted" asset is not emitted; a promotion emits it, which
re-triggers catalog tagging with the new model.
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import Asset, CronTriggerTimetable, Param, dag, get_current_context, task

from fashion_tagging.pipeline import MODEL_PROMOTED_ASSET
from fashion_tagging.settings import BACKBONES, get_settings

log = logging.getLogger(__name__)
SETTINGS = get_settings()
MODEL_PROMOTED = Asset(**MODEL_PROMOTED_ASSET)


@dag(
    dag_id="retrain_tagger",
    schedule=CronTriggerTimetable(SETTINGS.retrain_cron, timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["fashion-tagging", "training", "weekly"],
    default_args={"owner": "catalog-ml", "retries": 1, "retry_delay": dt.timedelta(minutes=5)},
    params={
        "backbone": Param(SETTINGS.backbone, enum=list(BACKBONES), description="image backbone"),
        "epochs": Param(SETTINGS.epochs, type="integer", minimum=1, description="max training epochs"),
        "fine_tune": Param(SETTINGS.fine_tune, enum=["none", "top", "full"],
                           description="backbone fine-tuning: 'top' = its last block on cached activations "
                                       "(CPU-friendly), 'full' = its top 30% on pixels (GPU), 'none' = frozen"),
        "image_size": Param(SETTINGS.image_size, type="integer", minimum=32, maximum=600,
                            description="backbone input size in pixels"),
    },
    doc_md=__doc__,
)
def retrain_tagger():
    @task
    def snapshot() -> dict:
        """Freeze the labelled catalog (from Postgres + the object store) the candidate trains on.

        Reviewers' accepted and corrected values are its labels; ``review_labels`` counts them.
        """
        from fashion_tagging.pipeline import snapshot_training_data

        return snapshot_training_data(get_settings())

    @task(queue=SETTINGS.gpu_queue, pool=SETTINGS.gpu_pool)
    def train(snapshot: dict) -> dict:
        from fashion_tagging.pipeline import train_model

        return train_model(get_settings(), dict(get_current_context()["params"]), snapshot)

    @task(queue=SETTINGS.gpu_queue, pool=SETTINGS.gpu_pool)
    def evaluate(snapshot: dict, trained: dict) -> dict:
        """Score the candidate, and the production model, on the fixed test split of the same snapshot."""
        from fashion_tagging.pipeline import evaluate_model

        return evaluate_model(get_settings(), trained, snapshot)

    @task
    def gate(evaluation: dict) -> dict:
        from fashion_tagging.pipeline import gate as decide

        settings = get_settings()
        decision = decide(evaluation, settings.baseline_accuracy, settings.gate_significance)
        log.info("Gate decision for %s: %s: %s", evaluation["version"],
                 "PROMOTE" if decision["promote"] else "REJECT", decision["reason"])
        log.info("Gate figures: %s", decision)
        return decision

    @task
    def register(trained: dict, evaluation: dict, decision: dict) -> dict:
        """Upload the artifact and register it: promoted if it passed, rejected (with why) if not."""
        from fashion_tagging.pipeline import register_and_promote

        result = register_and_promote(get_settings(), trained, evaluation, decision)
        log.info("Registry: %s", result)
        return result

    @task.short_circuit
    def promoted(registered: dict) -> bool:
        if not registered["promoted"]:
            log.warning("Not promoted, the serving model is unchanged: %s", registered["reason"])
        return registered["promoted"]

    @task(outlets=[MODEL_PROMOTED])
    def announce_promotion(registered: dict) -> dict:
        """Emitting the asset triggers catalog tagging: the promoted model backfills, then serves."""
        get_current_context()["outlet_events"][MODEL_PROMOTED].extra = {"version": registered["version"]}
        log.info("Model %s is promoted: it serves once it has tagged the whole catalog.", registered["version"])
        return registered

    data = snapshot()
    trained = train(data)
    evaluation = evaluate(data, trained)
    registered = register(trained, evaluation, gate(evaluation))
    promoted(registered) >> announce_promotion(registered)


retrain_tagger()
