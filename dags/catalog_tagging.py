"""Nightly catalog tagging: ingest new manifests, tag untagged products in batches, record the run.

Runs on ``FT_NIGHTLY_CRON`` and also whenever the retrain DAG promotes a model (the new production
model has tagged nothing yet, so every product is "untagged" again). Safe to re-run, clear or
backfill: a batch writes with (product_id, model_version) upserts, so nothing is ever duplicated.
Heavy libraries are imported inside the tasks only, which keeps parsing this file fast.
"""

from __future__ import annotations

import datetime as dt
import logging

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, get_current_context, task

from fashion_tagging.pipeline import CATALOG_TAGS_ASSET, MODEL_PROMOTED_ASSET
from fashion_tagging.settings import get_settings

log = logging.getLogger(__name__)
SETTINGS = get_settings()
CATALOG_TAGS = Asset(**CATALOG_TAGS_ASSET)
MODEL_PROMOTED = Asset(**MODEL_PROMOTED_ASSET)


@dag(
    dag_id="catalog_tagging",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SETTINGS.nightly_cron, timezone="UTC"), assets=MODEL_PROMOTED
    ),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["fashion-tagging", "tagging", "nightly"],
    default_args={"owner": "catalog-ml", "retries": 2, "retry_delay": dt.timedelta(minutes=1)},
    doc_md=__doc__,
)
def catalog_tagging():
    @task(multiple_outputs=True)
    def discover() -> dict:
        """Ingest new manifests, then list the products the production model has not tagged yet."""
        from fashion_tagging.pipeline import discover_new_products

        return discover_new_products(get_settings(), run_id=get_current_context()["run_id"])

    @task.short_circuit
    def anything_to_tag(product_ids: list[int], model_version: str | None) -> bool:
        """A night with nothing new skips the tagging tasks instead of mapping over nothing."""
        if model_version is None:
            log.warning("Nothing to tag: no production model is registered yet (run the retrain DAG).")
            return False
        if not product_ids:
            log.info("Nothing new to tag for model %s: every product is already tagged.", model_version)
            return False
        log.info("%d products to tag with model %s.", len(product_ids), model_version)
        return True

    @task
    def plan(product_ids: list[int]) -> list[list[int]]:
        from fashion_tagging.pipeline import plan_batches

        return plan_batches(product_ids, get_settings().tagging_batch_size)

    @task(queue=SETTINGS.gpu_queue, pool=SETTINGS.gpu_pool, map_index_template="{{ batch_label }}")
    def tag_batch(product_ids: list[int], model_version: str) -> dict:
        """One batch of hundreds to thousands of products; idempotent, so retries are safe."""
        from fashion_tagging.tagging import tag_batch as run_batch

        context = get_current_context()
        context["batch_label"] = f"{product_ids[0]}..{product_ids[-1]} ({len(product_ids)})"
        result = run_batch(product_ids, settings=get_settings(), model_version=model_version,
                           run_id=context["run_id"])
        return result.as_dict()

    @task(outlets=[CATALOG_TAGS])
    def summarize(discovered: dict, batch_results: list[dict]) -> dict:
        from fashion_tagging.pipeline import record_run, summarize_run

        summary = summarize_run(discovered["run_id"], list(batch_results), started_at=discovered["started_at"])
        record_run(get_settings(), summary)
        log.info("Tagging run summary: %s", summary)
        return summary

    discovered = discover()
    gate = anything_to_tag(discovered["product_ids"], discovered["model_version"])
    batches = plan(discovered["product_ids"])
    gate >> batches
    results = tag_batch.partial(model_version=discovered["model_version"]).expand(product_ids=batches)
    summarize(discovered, results)


catalog_tagging()
