"""Nightly catalog tagging: ingest new manifests, tag what changed in bounded batches, close the run.

Runs on ``FT_NIGHTLY_CRON``, whenever the retrain DAG promotes a model, and again by itself
while a backfill is larger than one run may take. Only small descriptors travel through XCom:
``discover`` returns counts, ``plan`` returns at most ``FT_TAGGING_MAX_TASKS`` batch ids (ranges
of ``products.change_seq`` recorded in the ``tagging_batches`` work table), each ``tag_batch``
reads its own products, and ``finish`` reads the outcome from the work table. ``finish`` always
runs: a run with a failed batch is recorded failed with the batch named, and the next run
re-issues exactly the unfinished ranges. Every write is an idempotent upsert per transaction.
``check_drift`` then compares what the run tagged with each model's training distribution and
stores the figures; a drifted run logs a warning, calls ``FT_DRIFT_ALERT_CALLBACK`` and emits the
``drift_alert`` Asset (schedule an alerting DAG on it).
Heavy libraries are imported inside the tasks only, which keeps parsing this file fast.
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, TriggerRule, dag, get_current_context, task

from fashion_tagging.pipeline import CATALOG_TAGS_ASSET, DRIFT_ALERT_ASSET, MODEL_PROMOTED_ASSET, TAGGING_BACKLOG_ASSET
from fashion_tagging.settings import get_settings

log = logging.getLogger(__name__)
SETTINGS = get_settings()
CATALOG_TAGS = Asset(**CATALOG_TAGS_ASSET)
MODEL_PROMOTED = Asset(**MODEL_PROMOTED_ASSET)
TAGGING_BACKLOG = Asset(**TAGGING_BACKLOG_ASSET)
DRIFT_ALERT = Asset(**DRIFT_ALERT_ASSET)


@dag(
    dag_id="catalog_tagging",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SETTINGS.nightly_cron, timezone="UTC"), assets=MODEL_PROMOTED | TAGGING_BACKLOG
    ),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["fashion-tagging", "tagging", "nightly"],
    default_args={"owner": "catalog-ml", "retries": 2, "retry_delay": dt.timedelta(minutes=1)},
    doc_md=__doc__,
)
def catalog_tagging():
    @task
    def discover() -> dict:
        """Ingest new manifests; count what the serving and promoted models have left to tag."""
        from fashion_tagging.pipeline import discover_tagging_work

        return discover_tagging_work(get_settings(), run_id=get_current_context()["run_id"])

    @task
    def plan(discovered: dict) -> list[dict]:
        """At most FT_TAGGING_MAX_TASKS batch descriptors, whatever the catalog size."""
        from fashion_tagging.pipeline import plan_tagging_run

        return plan_tagging_run(get_settings(), discovered)

    @task(queue=SETTINGS.gpu_queue, pool=SETTINGS.gpu_pool, map_index_template="{{ batch_label }}")
    def tag_batch(batch: dict) -> dict:
        """One range of the work table; resumable and idempotent, so retries are safe."""
        from fashion_tagging.tagging import tag_work_batch

        context = get_current_context()
        context["batch_label"] = batch["label"]
        result = tag_work_batch(batch["batch_id"], settings=get_settings(), run_id=context["run_id"])
        return {key: value for key, value in result.as_dict().items()
                if key in ("model_version", "requested", "tagged", "errors", "total_seconds")}

    @task(trigger_rule=TriggerRule.ALL_DONE, outlets=[CATALOG_TAGS])
    def finish(discovered: dict) -> dict:
        """Always runs: advance, activate a model that now covers the catalog, record the run."""
        from airflow.sdk.exceptions import AirflowFailException

        from fashion_tagging.pipeline import finish_tagging_run

        summary = finish_tagging_run(get_settings(), discovered)
        if summary["status"] != "success":
            raise AirflowFailException(f"{len(summary['failed_batches'])} batch(es) failed: "
                                       f"{summary['failed_batches'][:5]} (the next run re-issues them)")
        return {key: summary[key] for key in ("status", "batches", "products_tagged", "errors", "more_work")}

    @task.short_circuit
    def backlog_left(summary: dict) -> bool:
        """More than one run's worth was waiting: schedule the next run now rather than tomorrow night."""
        return bool(summary["more_work"])

    @task(outlets=[TAGGING_BACKLOG])
    def continue_backlog() -> None:
        log.info("Backlog left after this run: emitting %s to run again.", TAGGING_BACKLOG.name)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def check_drift(discovered: dict) -> dict:
        """What this run tagged vs each model's training distribution: stored, logged, alerted above the threshold."""
        from fashion_tagging.pipeline import check_tagging_drift

        return check_tagging_drift(get_settings(), discovered)

    @task.short_circuit
    def drifted(drift: dict) -> bool:
        return bool(drift["alert"])

    @task(outlets=[DRIFT_ALERT])
    def announce_drift(drift: dict) -> None:
        """The Airflow-side alert: an Asset event other DAGs (paging, a retrain) can be scheduled on."""
        get_current_context()["outlet_events"][DRIFT_ALERT].extra = {
            "run_id": drift["run_id"], "reports": [r for r in drift["reports"] if r["alert"]]}
        log.warning("Drift alert emitted as %s: %s", DRIFT_ALERT.name, drift["reports"])

    discovered = discover()
    batches = plan(discovered)
    results = tag_batch.expand(batch=batches)
    summary = finish(discovered)
    results >> summary
    backlog_left(summary) >> continue_backlog()
    drift = check_drift(discovered)
    summary >> drift
    drifted(drift) >> announce_drift(drift)


catalog_tagging()
