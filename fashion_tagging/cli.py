"""The ``fashion-tagging`` console command.

Every sub-command is a thin wrapper over a library function, so the same work runs identically
from the shell, from tests and from Airflow tasks. Errors a user can fix are printed as one
line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# TensorFlow's C++ start-up chatter hides the command's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fashion_tagging.settings import PRIMARY_HEAD, Settings, SettingsError, get_settings  # noqa: E402


class UserError(Exception):
    """A problem the user can fix (bad path, no model yet): printed without a traceback."""


def _settings(args) -> Settings:
    overrides = {}
    for field in ("backbone", "image_size", "epochs", "data_dir", "home"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = Path(value) if field in ("data_dir", "home") else value
    try:
        return get_settings(**overrides)
    except SettingsError as error:  # name the command-line option, not the settings field
        lines = [line.split("=", 1) for line in str(error).splitlines()]
        raise SettingsError("\n".join(f"--{name.replace('_', '-')} {rest}" if name in overrides else f"{name}={rest}"
                                      for name, rest in lines)) from None


def cmd_train(args) -> int:
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.evaluate import evaluate
    from fashion_tagging.train import train

    settings = _settings(args)
    started = time.perf_counter()

    def catalog():
        products = load_kaggle_catalog(settings.data_dir).products
        return products.groupby("split").head(args.limit).reset_index(drop=True) if args.limit else products

    # Loaded twice rather than held through training (~1.5 KB a product: 1.5 GB at a million).
    result = train(settings, products=catalog, fine_tune=args.fine_tune)
    print(f"trained model {result.version} -> {result.artifact_dir} ({result.timings})")
    if not args.no_evaluate:
        report = evaluate(result.artifact_dir, settings, products=catalog())
        print((result.artifact_dir / "report.md").read_text())
        summary = {"version": result.version, "train_seconds": result.timings["train_seconds"],
                   "evaluate_seconds": report["resources"]["evaluate_seconds"],
                   "total_seconds": round(time.perf_counter() - started, 1),
                   "peak_rss_mib": report["resources"]["peak_rss_mib"],
                   "train_peak_rss_mib_after": result.peak_rss_mib_after,
                   "train_resident_peaks_mib_after": result.resident_peaks_mib_after}
        print(json.dumps(summary))
    return 0


def model_artifact(settings: Settings, version: str | None = None) -> tuple[str, Path]:
    """The model a command runs and its local directory: the registry's by default.

    No ``version``: the serving model (what the catalog's readers see), else the promoted one
    still tagging the catalog. A ``version`` is looked up in the registry, then among the local
    artifacts that ``train`` wrote without registering them.
    """
    from fashion_tagging.artifacts import find_artifact, local_artifact_dir
    from fashion_tagging.db import repository
    from fashion_tagging.pipeline import catalog_engine

    with catalog_engine(settings).connect() as conn:
        if version is None:
            row = repository.serving_model(conn) or repository.production_model(conn)
            if row is None:
                raise UserError("no production model in the registry yet: run the retrain DAG (`make demo` does), "
                                "or pass --version with a local model listed by `fashion-tagging models`")
        else:
            try:
                row = repository.get_model(conn, version)
            except repository.NotFound:
                return version, find_artifact(settings, version)
    return row["version"], local_artifact_dir(settings, row["version"], row["artifact_uri"])


def cmd_evaluate(args) -> int:
    from fashion_tagging.evaluate import evaluate

    settings = _settings(args)
    version, artifact_dir = model_artifact(settings, args.version)
    print(f"evaluating model {version} on {args.split}", flush=True)
    evaluate(artifact_dir, settings, split=args.split)
    print((artifact_dir / "report.md").read_text())
    print(f"report: {artifact_dir / 'metrics.json'}")
    return 0


def cmd_predict(args) -> int:
    from fashion_tagging.artifacts import Tagger
    from fashion_tagging.images import ImageDecodeError, decode_image, read_photo_file

    settings = _settings(args)
    version, artifact_dir = model_artifact(settings, args.version)
    print(f"model {version}", file=sys.stderr)
    tagger = Tagger.load(artifact_dir, engine=settings.inference_engine)
    try:  # the tagging path's decode rule and caps (byte cap before reading, pixel cap, EXIF)
        images = [decode_image(read_photo_file(p), tagger.image_size) if p else None for p in args.image or [None]]
    except ImageDecodeError as error:
        raise UserError(str(error)) from None
    texts = args.text or [""] * len(images)
    if len(texts) != len(images):
        raise UserError("give as many --text as --image (use --text '' for an empty one)")
    preds = tagger.predict(images, texts, top_k=settings.top_k)
    for i in range(len(images)):
        print(json.dumps({head: {"label": preds.labels[head][i], "confidence": round(float(preds.confidences[head][i]), 4),
                                 "top_k": preds.top_k[head][i]} for head in tagger.heads}))
    return 0


def cmd_export(args) -> int:
    from fashion_tagging.catalog import load_kaggle_catalog, with_clean_labels
    from fashion_tagging.engines import build_cpu_exports

    settings = _settings(args)
    if args.artifact:
        artifact_dir, version = Path(args.artifact), Path(args.artifact).name
    else:
        version, artifact_dir = model_artifact(settings, args.version)
    products = load_kaggle_catalog(settings.data_dir).products
    rows = {split: with_clean_labels(products[products["split"] == split].reset_index(drop=True))
            for split in ("train", "val")}
    print(f"exporting model {version} for CPU workers (LiteRT float32 + int8 checked on val)", flush=True)
    report = build_cpu_exports(artifact_dir, rows["train"], rows["val"], seed=settings.seed,
                               batch_size=settings.inference_batch_size)
    print(json.dumps(report, indent=1))
    return 0


def cmd_embed(args) -> int:
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.features import catalog_image_embeddings

    settings = _settings(args)
    products = load_kaggle_catalog(settings.data_dir).products
    started = time.perf_counter()
    result = catalog_image_embeddings(products["id"], products["image_path"].tolist(), backbone_name=settings.backbone,
                                      image_size=settings.image_size, cache_dir=settings.cache_dir,
                                      batch_size=settings.inference_batch_size, engine=settings.inference_engine,
                                      # what `train` will ask of the cache: "top" also needs the last block's inputs
                                      with_top_inputs=settings.fine_tune == "top")
    print(json.dumps({"products": len(products), "with_image": int(result.has_image.sum()),
                      "errors": len(result.errors), "seconds": round(time.perf_counter() - started, 1)}))
    return 0


def cmd_import_catalog(args) -> int:
    from fashion_tagging.ingest import import_catalog

    settings = _settings(args)
    report = import_catalog(settings, args.source, limit=args.limit, manifest_format=args.format,
                            load_into_db=not args.no_db)
    print(json.dumps(report, indent=1, default=str))
    return 0


def cmd_similar(args) -> int:
    from fashion_tagging.db.engine import get_engine
    from fashion_tagging.db.repository import NotFound, similar_products

    with get_engine(_settings(args)).begin() as conn:
        try:
            rows = similar_products(conn, args.product_id, args.k, args.version)
        except NotFound as error:
            raise UserError(str(error)) from None
    for product_id, title, article_type, distance in rows:
        print(f"{product_id}\t{distance:.3f}\t{article_type}\t{title}")
    return 0


def cmd_tags(args) -> int:
    """Products' tags as every reader sees them: a reviewer's value where there is one, else the model's."""
    from fashion_tagging.db.engine import get_engine
    from fashion_tagging.db.repository import serving_model
    from fashion_tagging.review import product_tags

    with get_engine(_settings(args)).connect() as conn:
        serving = serving_model(conn)
        version = args.version or (serving["version"] if serving else None)
        entries = product_tags(conn, args.product_ids, version)
    print(json.dumps({"model_version": version, "products": entries}, indent=1, default=str))
    missing = sorted(set(args.product_ids) - {entry["product_id"] for entry in entries})
    if missing:
        raise UserError(f"not in the catalog: {', '.join(map(str, missing))}")
    return 0


DEMO_REFERENCE_PRODUCTS = 14000  # 8,000 scored 0.9089 on its test rows: below the gate
DEMO_NEW_ARRIVALS = 500


def demo_slices(data_dir: Path, reference: int, arrivals: int, seed: int) -> tuple[list[int], list[int]]:
    """A stratified reference slice (all three splits) and a disjoint batch of "new arrivals"."""
    import pandas as pd

    listing = data_dir / "split.csv" if (data_dir / "split.csv").is_file() else data_dir / "styles.csv"
    ids = pd.to_numeric(pd.read_csv(listing, usecols=["id"], dtype=str, on_bad_lines="skip")["id"], errors="coerce")
    shuffled = ids.dropna().astype(int).drop_duplicates().sample(frac=1.0, random_state=seed).tolist()
    return sorted(shuffled[:reference]), sorted(shuffled[reference:reference + arrivals])


def _run_dag(dag_id: str, conf: dict, settings: Settings) -> dict:
    """Run a DAG with dag.test(), showing its tasks and progress live; on failure, the failed task's log."""
    from fashion_tagging.pipeline import run_dag_locally
    from fashion_tagging.progress import DagRunFollower, task_log_lines

    print(f"\n== running DAG {dag_id} (dag.test) ...", flush=True)
    result = run_dag_locally(dag_id, conf, settings=settings,
                             on_line=DagRunFollower(lambda line: print(line, flush=True)))
    if result.get("state") != "success":
        failed = [task for task, state in result.get("tasks", {}).items()
                  if state == "failed" or (isinstance(state, list) and "failed" in state)]
        for task in failed:
            print(f"\n-- last lines of task {task}:", file=sys.stderr)
            print("\n".join(task_log_lines(result["log_path"], task)), file=sys.stderr)
        if not failed:
            print(result.get("log_tail", ""), file=sys.stderr)
        raise UserError(f"DAG {dag_id} ended {result.get('state')}; task states: {result.get('tasks')}; "
                        f"whole log: {result['log_path']}")
    print(f"   {dag_id}: success in {result['seconds']:.0f} s (whole log: {result['log_path']})")
    return result


def _run_summary(engine, run_id: str | None) -> dict:
    """A tagging run's full summary as its ``finish`` step recorded it (XCom only carries a digest)."""
    import sqlalchemy as sa

    from fashion_tagging.db import schema

    if not run_id:
        return {}
    with engine.connect() as conn:
        runs = schema.tagging_runs
        return conn.execute(sa.select(runs.c.details).where(runs.c.run_id == run_id)).scalar() or {}


def cmd_demo(args) -> int:
    """The README's main job: the whole story on embedded defaults (Postgres, local object store)."""
    from fashion_tagging.db.repository import similar_products
    from fashion_tagging.ingest import import_catalog
    from fashion_tagging.pipeline import catalog_engine, local_airflow_env

    settings = _settings(args)
    started = time.perf_counter()
    engine = catalog_engine(settings)
    print(f"== catalog database: {engine.url.render_as_string(hide_password=True)}")
    print(f"== object store: {settings.resolved_object_store_url}")
    reference, arrivals = demo_slices(settings.data_dir, args.products, args.new_products, settings.seed)
    imported = import_catalog(settings, ids=reference, batch_name="demo-reference", load_into_db=False)
    print(f"== imported {imported['products']} labelled products into the store")

    retrain = _run_dag("retrain_tagger", {"epochs": settings.epochs}, settings)
    gate = retrain["xcom"].get("gate", {})
    evaluation = retrain["xcom"].get("evaluate", {})
    print(f"   gate: {'PROMOTED' if gate.get('promote') else 'REJECTED'} - {gate.get('reason')}")

    imported = import_catalog(settings, ids=arrivals, batch_name="demo-new-arrivals", load_into_db=False)
    print(f"\n== {imported['products']} new products arrived in the store")
    nightly = _run_dag("catalog_tagging", {}, settings)
    summary = _run_summary(engine, nightly.get("run_id"))
    quiet = _run_dag("catalog_tagging", {}, settings)

    print("\n== what happened")
    print(json.dumps({"model": gate.get("candidate_version") or evaluation.get("version"),
                      "article_type_accuracy_test": evaluation.get("article_type_accuracy"),
                      "baseline": settings.baseline_accuracy, "gate": gate,
                      "tagging_run": summary, "quiet_night_seconds": quiet["seconds"]}, indent=1, default=str))
    example = arrivals[0]
    with engine.begin() as conn:
        try:
            neighbours = similar_products(conn, example, 5)
        except LookupError as error:
            neighbours = []
            print(f"   similar products unavailable: {error}")
    if neighbours:
        print(f"\n== products similar to {example}:")
        for product_id, title, article_type, distance in neighbours:
            print(f"   {product_id}\t{distance:.3f}\t{article_type}\t{title}")
    env = local_airflow_env(settings)
    print(f"\n== done in {time.perf_counter() - started:.0f} s. Open the Airflow UI on the same data:")
    print(f"   FT_HOME={settings.home} AIRFLOW_HOME={env['AIRFLOW_HOME']} \\\n"
          f"   AIRFLOW__CORE__DAGS_FOLDER={env['AIRFLOW__CORE__DAGS_FOLDER']} \\\n"
          f"   AIRFLOW__CORE__PLUGINS_FOLDER={Path(env['AIRFLOW__CORE__DAGS_FOLDER']).parent / 'plugins'} \\\n"
          f"   AIRFLOW__DATABASE__SQL_ALCHEMY_CONN={env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']} \\\n"
          f"   .venv/bin/airflow standalone")
    print("   then http://localhost:8080 -> 'Catalog tagging' in the navigation "
          "(admin password: $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)")
    return 0


def cmd_models(args) -> int:
    """The registry (status, gate, accuracy), then local artifacts ``train`` wrote without registering."""
    from fashion_tagging.dashboard import model_registry, read_only
    from fashion_tagging.pipeline import catalog_engine

    settings = _settings(args)
    with read_only(catalog_engine(settings)) as conn:
        registry = model_registry(conn)
    print(f"{'version':<42} {'status':<10} {PRIMARY_HEAD + ' test':>16}  gate")
    for entry in reversed(registry):
        accuracy = entry["accuracy"].get(PRIMARY_HEAD)
        print(f"{entry['version']:<42} {entry['status']:<10} {_fmt(accuracy):>16}  {entry['gate_reason'] or ''}")
    registered = {entry["version"] for entry in registry}
    root = settings.artifacts_dir
    for path in sorted(root.glob("*/config.json"), reverse=True) if root.is_dir() else []:
        if path.parent.name in registered:
            continue
        metrics_path = path.parent / "metrics.json"
        accuracy = json.loads(metrics_path.read_text()).get("test", {}).get("article_type_accuracy") \
            if metrics_path.is_file() else None
        print(f"{path.parent.name:<42} {'local':<10} {_fmt(accuracy):>16}  not in the registry (--version picks it)")
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_status(args) -> int:
    """Where the catalog database and object store are, which model serves, and the last runs."""
    from fashion_tagging.dashboard import backfill_progress, catalog_counts, model_registry, read_only, recent_runs
    from fashion_tagging.objectstore import open_configured_store
    from fashion_tagging.pipeline import catalog_engine

    settings = _settings(args)
    engine = catalog_engine(settings)
    embedded = "" if settings.database_url else f" (embedded, data in {settings.pgdata_dir})"
    print(f"catalog database: {engine.url.render_as_string(hide_password=True)}{embedded}")
    store_url = settings.resolved_object_store_url
    try:
        manifests = len(open_configured_store(settings).list_keys(settings.catalog_prefix))
        print(f"object store:     {store_url} ({manifests} catalog manifest(s) under {settings.catalog_prefix})")
    except Exception as error:  # noqa: BLE001 - status reports what is wrong instead of failing
        print(f"object store:     {store_url} UNREACHABLE: {type(error).__name__}: {error}")
    with read_only(engine) as conn:
        by_status = {}
        for entry in model_registry(conn):
            by_status[entry["status"]] = entry
        serving, backfill = by_status.get("serving"), backfill_progress(conn)
        counts = catalog_counts(conn, serving["version"] if serving else None)
        runs = recent_runs(conn, limit=args.runs)
    if serving:
        print(f"serving model:    {serving['version']} ({PRIMARY_HEAD} test accuracy "
              f"{_fmt(serving['accuracy'].get(PRIMARY_HEAD))}); {counts['tagged']:,} of {counts['products']:,} "
              "products tagged")
    else:
        print(f"serving model:    none yet ({counts['products']:,} products in the catalog)")
    if backfill:
        print(f"promoted model:   {backfill['version']} tagging the catalog: {int(backfill['tagged']):,} "
              f"of {counts['products']:,} products so far")
    print("last tagging runs:" if runs else "last tagging runs: none")
    for run in reversed(runs):
        rate = f", {run['products_per_second']:.1f}/s" if run["products_per_second"] else ""
        print(f"  {run['started_at']:%Y-%m-%d %H:%M} {run['status']:<8} {run['products_tagged']:>9,} tagged, "
              f"{run['errors']:,} errors{rate}  model {run['model_version']}  ({run['run_id']})")
    return 0


def cmd_db(args) -> int:
    from fashion_tagging.db.engine import migrate_database, running_port, stop_embedded_postgres

    settings = _settings(args)
    if args.action == "migrate":
        engine = migrate_database(settings)
        print(f"catalog database at head: {engine.url.render_as_string(hide_password=True)}")
    elif settings.database_url:
        raise UserError("FT_DATABASE_URL points at an external database: the embedded one is not used, "
                        "nothing to stop")
    elif running_port(settings.pgdata_dir) is None:
        print(f"embedded PostgreSQL is not running ({settings.pgdata_dir})")
    else:
        stop_embedded_postgres(settings.pgdata_dir)
        print(f"embedded PostgreSQL stopped ({settings.pgdata_dir})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashion-tagging", description=__doc__.splitlines()[0] + " Tags a fashion catalog.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        sub.add_argument("--data-dir", help="Kaggle-layout catalog folder (FT_DATA_DIR)")
        sub.add_argument("--home", help="state directory: models, caches, embedded DB (FT_HOME)")
        return sub

    sub = add("train", cmd_train, "train the fused model on the train split (early-stopped on val), then evaluate on test")
    sub.add_argument("--epochs", type=int)
    sub.add_argument("--backbone", choices=["efficientnet-lite0", "efficientnet-b0"])
    sub.add_argument("--image-size", type=int)
    sub.add_argument("--limit", type=int, help="at most N products per split (a quick slice)")
    sub.add_argument("--fine-tune", choices=["none", "top", "full"],
                     help="backbone fine-tuning (default FT_FINE_TUNE): 'top' trains its last block on cached "
                          "activations (fits a CPU), 'full' its top 30%% end to end on pixels (a GPU job)")
    sub.add_argument("--no-evaluate", action="store_true")

    sub = add("evaluate", cmd_evaluate, "evaluate a model (default: the registry's serving model) and write its report")
    sub.add_argument("--split", default="test", choices=["test", "val"])
    sub.add_argument("--version", help="registered or local model version (default: the serving one)")

    sub = add("predict", cmd_predict, "tag products from image files and/or texts")
    sub.add_argument("--image", action="append", help="image file (repeatable)")
    sub.add_argument("--text", action="append", help="title + description (repeatable, same order as --image)")
    sub.add_argument("--version", help="model version (default: the registry's serving model)")

    sub = add("export", cmd_export, "build a model's CPU inference exports (LiteRT float32, and int8 calibrated on "
                                    "train photos, served only if val articleType accuracy drops <= 0.2 points); "
                                    "training does this itself")
    sub.add_argument("--version", help="registered or local model version (default: the serving one)")
    sub.add_argument("--artifact", help="a model artifact directory instead of a version")

    sub = add("embed", cmd_embed, "precompute the frozen-backbone image embeddings of the whole catalog (cached)")
    sub.add_argument("--backbone", choices=["efficientnet-lite0", "efficientnet-b0"])
    sub.add_argument("--image-size", type=int)

    sub = add("demo", cmd_demo, "run the whole job end to end on embedded defaults (the README's main command)")
    sub.add_argument("--products", type=int, default=DEMO_REFERENCE_PRODUCTS,
                     help="labelled products in the reference slice (train/val/test)")
    sub.add_argument("--new-products", type=int, default=DEMO_NEW_ARRIVALS, help="new arrivals to tag")
    sub.add_argument("--epochs", type=int)

    sub = add("import-catalog", cmd_import_catalog,
              "import a Kaggle-layout folder into the object store as a catalog (and load it into the database)")
    sub.add_argument("source", nargs="?", help="Kaggle-layout folder (default: FT_DATA_DIR)")
    sub.add_argument("--limit", type=int, help="only the first N products")
    sub.add_argument("--format", default="parquet", choices=["parquet", "csv", "jsonl"])
    sub.add_argument("--no-db", action="store_true", help="only write the store, do not load the database")

    sub = add("db", cmd_db, "the catalog database: `migrate` (Alembic, to head) or `stop` (the embedded PostgreSQL, "
                            "which otherwise keeps running for the next command)")
    sub.add_argument("action", choices=["migrate", "stop"])

    sub = add("similar", cmd_similar, "the k most similar products to a product (pgvector HNSW search)")
    sub.add_argument("product_id", type=int)
    sub.add_argument("-k", type=int, default=10)
    sub.add_argument("--version", help="model version (default: the serving one)")

    sub = add("tags", cmd_tags, "products' tags as JSON, reviewed values in place of the model's (label, predicted, "
                                "status, reviewer)")
    sub.add_argument("product_ids", type=int, nargs="+", metavar="product_id")
    sub.add_argument("--version", help="whose model tags (default: the serving one)")

    add("models", cmd_models, "the model registry (status, gate, test accuracy) and unregistered local models")
    sub = add("status", cmd_status, "the catalog database, the object store, the serving model and the last runs")
    sub.add_argument("--runs", type=int, default=5, help="how many recent tagging runs to show")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("embedded_postgres", "alembic"):  # their INFO lines bury the command's own output
        logging.getLogger(chatty).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        _settings(args)  # every command: a bad setting is one clear line before any heavy import
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError) as error:
        for line in str(error).splitlines() or [""]:  # a SettingsError has one line per bad variable
            print(f"fashion-tagging {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
