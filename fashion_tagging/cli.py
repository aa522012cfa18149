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

from fashion_tagging.settings import PRIMARY_HEAD, Settings, get_settings  # noqa: E402


class UserError(Exception):
    """A problem the user can fix (bad path, no model yet): printed without a traceback."""


def _settings(args) -> Settings:
    overrides = {}
    for field in ("backbone", "image_size", "epochs", "data_dir", "home"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = Path(value) if field in ("data_dir", "home") else value
    return get_settings(**overrides)


def cmd_train(args) -> int:
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.evaluate import evaluate
    from fashion_tagging.train import train

    settings = _settings(args)
    started = time.perf_counter()
    products = load_kaggle_catalog(settings.data_dir).products
    if args.limit:
        products = products.groupby("split").head(args.limit).reset_index(drop=True)
    result = train(settings, products=products)
    print(f"trained model {result.version} -> {result.artifact_dir} ({result.timings})")
    if not args.no_evaluate:
        report = evaluate(result.artifact_dir, settings, products=products)
        print((result.artifact_dir / "report.md").read_text())
        summary = {"version": result.version, "train_seconds": result.timings["train_seconds"],
                   "evaluate_seconds": report["resources"]["evaluate_seconds"],
                   "total_seconds": round(time.perf_counter() - started, 1),
                   "peak_rss_mib": report["resources"]["peak_rss_mib"]}
        print(json.dumps(summary))
    return 0


def cmd_evaluate(args) -> int:
    from fashion_tagging.artifacts import find_artifact
    from fashion_tagging.evaluate import evaluate

    settings = _settings(args)
    artifact_dir = find_artifact(settings, args.version)
    evaluate(artifact_dir, settings, split=args.split)
    print((artifact_dir / "report.md").read_text())
    print(f"report: {artifact_dir / 'metrics.json'}")
    return 0


def cmd_predict(args) -> int:
    from fashion_tagging.artifacts import Tagger
    from fashion_tagging.images import decode_image

    settings = _settings(args)
    tagger = Tagger.load_version(settings, args.version)
    images = [decode_image(Path(p).read_bytes(), tagger.image_size) if p else None for p in args.image or [None]]
    texts = args.text or [""] * len(images)
    if len(texts) != len(images):
        raise UserError("give as many --text as --image (use --text '' for an empty one)")
    preds = tagger.predict(images, texts, top_k=settings.top_k)
    for i in range(len(images)):
        print(json.dumps({head: {"label": preds.labels[head][i], "confidence": round(float(preds.confidences[head][i]), 4),
                                 "top_k": preds.top_k[head][i]} for head in tagger.heads}))
    return 0


def cmd_embed(args) -> int:
    from fashion_tagging.catalog import load_kaggle_catalog
    from fashion_tagging.features import catalog_image_embeddings

    settings = _settings(args)
    products = load_kaggle_catalog(settings.data_dir).products
    started = time.perf_counter()
    result = catalog_image_embeddings(products["id"], products["image_path"].tolist(), backbone_name=settings.backbone,
                                      image_size=settings.image_size, cache_dir=settings.cache_dir,
                                      batch_size=settings.inference_batch_size)
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


def cmd_db_migrate(args) -> int:
    from fashion_tagging.db.engine import migrate_database

    engine = migrate_database(_settings(args))
    print(f"catalog database at head: {engine.url.render_as_string(hide_password=True)}")
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


def cmd_demo(args) -> int:
    """The README's main job. (Until the pipeline lands: train + evaluate on a small slice.)"""
    args.limit = args.limit or 300
    args.no_evaluate = False
    return cmd_train(args)


def cmd_models(args) -> int:
    settings = _settings(args)
    root = settings.artifacts_dir
    for path in sorted(root.glob("*/config.json")) if root.is_dir() else []:
        metrics_path = path.parent / "metrics.json"
        accuracy = json.loads(metrics_path.read_text()).get("test", {}).get("article_type_accuracy") \
            if metrics_path.is_file() else None
        print(f"{path.parent.name}\t{PRIMARY_HEAD} test accuracy: {accuracy}")
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
    sub.add_argument("--no-evaluate", action="store_true")

    sub = add("evaluate", cmd_evaluate, "evaluate a model version (default: newest) and write its report")
    sub.add_argument("--version")
    sub.add_argument("--split", default="test", choices=["test", "val"])

    sub = add("predict", cmd_predict, "tag products from image files and/or texts")
    sub.add_argument("--image", action="append", help="image file (repeatable)")
    sub.add_argument("--text", action="append", help="title + description (repeatable, same order as --image)")
    sub.add_argument("--version")

    sub = add("embed", cmd_embed, "precompute the frozen-backbone image embeddings of the whole catalog (cached)")
    sub.add_argument("--backbone", choices=["efficientnet-lite0", "efficientnet-b0"])
    sub.add_argument("--image-size", type=int)

    sub = add("demo", cmd_demo, "run the whole job end to end on embedded defaults (the README's main command)")
    sub.add_argument("--limit", type=int, help="products per split to use (default 300)")

    sub = add("import-catalog", cmd_import_catalog,
              "import a Kaggle-layout folder into the object store as a catalog (and load it into the database)")
    sub.add_argument("source", nargs="?", help="Kaggle-layout folder (default: FT_DATA_DIR)")
    sub.add_argument("--limit", type=int, help="only the first N products")
    sub.add_argument("--format", default="parquet", choices=["parquet", "csv", "jsonl"])
    sub.add_argument("--no-db", action="store_true", help="only write the store, do not load the database")

    sub = add("db-migrate", cmd_db_migrate, "create or upgrade the catalog database schema (Alembic)")

    sub = add("similar", cmd_similar, "the k most similar products to a product (pgvector HNSW search)")
    sub.add_argument("product_id", type=int)
    sub.add_argument("-k", type=int, default=10)
    sub.add_argument("--version", help="model version (default: production)")

    add("models", cmd_models, "list trained model versions and their test accuracy")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError) as error:
        print(f"fashion-tagging {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
