"""The retrain DAG on the real catalog: what the gate decides, with its figures.

Imports the Kaggle catalog (or ``--limit`` products) into a temporary home (embedded PostgreSQL +
local object store), then runs ``retrain_tagger`` through ``dag.test()`` with the real 0.91
baseline: snapshot -> train -> evaluate on the fixed test split -> gate -> register. A copy of an
existing frozen-backbone feature store (``--feature-store``) is reused when given, exactly as
the DAG reuses its own cache between weekly runs. Prints the decision and writes
``benchmarks/results/dag_retrain_gate.json``.

    .venv/bin/python benchmarks/dag_retrain_gate.py [--epochs 12] [--limit N] \\
        [--feature-store .fashion-tagging/cache/features]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "dag_retrain_gate.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--limit", type=int, help="only the first N catalog rows (default: all)")
    parser.add_argument("--feature-store", type=Path, help="a feature store folder (<home>/cache/features) to start from")
    args = parser.parse_args()

    from fashion_tagging import pipeline
    from fashion_tagging.db.engine import stop_embedded_postgres
    from fashion_tagging.features import STORE_SUBDIR
    from fashion_tagging.ingest import import_kaggle_catalog
    from fashion_tagging.objectstore import open_configured_store
    from fashion_tagging.settings import get_settings

    with tempfile.TemporaryDirectory(prefix="ft-retrain-gate-") as home:
        settings = get_settings(home=Path(home), database_url=None, object_store_url=Path(home, "store").as_uri())
        os.environ["FT_HOME"] = home
        if args.feature_store and args.feature_store.is_dir():
            shutil.copytree(args.feature_store, settings.cache_dir / STORE_SUBDIR)
        try:
            imported = import_kaggle_catalog(settings.data_dir, open_configured_store(settings), limit=args.limit)
            conf = {"epochs": args.epochs or settings.epochs, "backbone": settings.backbone,
                    "image_size": settings.image_size, "fine_tune": "none"}
            run = pipeline.run_dag_locally("retrain_tagger", conf, settings=settings, timeout_s=3 * 3600)
        finally:
            stop_embedded_postgres(settings.pgdata_dir)
    if run["state"] != "success":
        raise SystemExit(f"retrain run failed: {run.get('log_tail')}")

    decision, evaluation, trained = run["xcom"]["gate"], run["xcom"]["evaluate"], run["xcom"]["train"]
    print(f"catalog: {imported.products} products; snapshot splits {run['xcom']['snapshot']['splits']}")
    print(f"candidate {trained['version']} ({trained['backbone']} @ {trained['image_size']}px, "
          f"{trained['epochs_run']} epochs)")
    print(f"{'figure':<38} {'value':>8}")
    for name, value in (("articleType test accuracy (fused)", evaluation["article_type_accuracy"]),
                        ("articleType test macro-F1 (fused)", evaluation["article_type_macro_f1"]),
                        ("articleType accuracy, image only", evaluation["image_only_accuracy"]),
                        ("articleType accuracy, text only", evaluation["text_only_accuracy"]),
                        ("baseline", decision["baseline"])):
        print(f"{name:<38} {value:>8.4f}")
    print(f"gate: promote={decision['promote']}: {decision['reason']}")
    print(f"task seconds: {run['task_seconds']}; DAG run {run['run_seconds']} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "what": "retrain_tagger via dag.test on the real catalog with the real 0.91 gate",
        "command": " ".join(["python benchmarks/dag_retrain_gate.py", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "products_imported": imported.products, "conf": conf, "snapshot": run["xcom"]["snapshot"],
        "train": trained, "evaluation": evaluation, "gate": decision, "registry": run["xcom"]["register"],
        "task_seconds": run["task_seconds"], "dag_run_seconds": run["run_seconds"],
        "tasks": run["tasks"],
    }, indent=1))
    print(f"wrote {RESULTS.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
