"""The hybrid blend of a trained model chosen again with this checkout's code, on ``val`` only.

Training chooses the blend weights (and the text conditions' thresholds, ``model.TEXT_CONDITIONS``)
after fitting, on the val decision sample. When that choice changes, a model need not be trained
again to see what the new choice does: this script loads the artifact, chooses again on the same
val products (``train.choose_primary_blend``, image embeddings from the feature store), writes a
copy of the artifact with the new blend and a calibration fitted again for it (the fitted weights
and exports are the original's), and prints the val figures of each choice. The copy can then be
scored on ``test`` (``benchmarks/robustness.py --artifact <copy>``).

    FT_HOME=<the training's home> .venv/bin/python benchmarks/blend_choice.py --artifact <model dir> --out <dir>

Writes ``benchmarks/results/blend_choice.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fashion_tagging.artifacts import Tagger, write_config  # noqa: E402
from fashion_tagging.catalog import load_kaggle_catalog  # noqa: E402
from fashion_tagging.evaluate import split_embeddings  # noqa: E402
from fashion_tagging.model import PRIMARY_HEAD  # noqa: E402
from fashion_tagging.settings import get_settings  # noqa: E402
from fashion_tagging.spelling import correction_config, corrector_for  # noqa: E402
from fashion_tagging.text_expert import text_expert_words  # noqa: E402
from fashion_tagging.train import (blend_config, calibrate_chosen_model, choose_primary_blend,  # noqa: E402
                                   training_split, val_decision_sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, required=True, help="a trained model artifact directory")
    parser.add_argument("--out", type=Path, required=True, help="where the copy with the new blend goes")
    parser.add_argument("--spelling-distance", type=int, default=None,
                        help="give the copy this spelling correction (settings.spelling_correction_distance; "
                             "0: none) instead of the artifact's")
    args = parser.parse_args()

    started = time.perf_counter()
    settings = get_settings()
    catalog = load_kaggle_catalog(settings.data_dir).products
    train_labels = training_split(catalog, "train")[PRIMARY_HEAD].tolist()
    val_rows = training_split(catalog, "val")
    del catalog
    tagger = Tagger.load(args.artifact, engine="keras")
    spelling_config = {"spelling_correction": tagger.config.get("spelling_correction")}
    if args.spelling_distance is not None:
        spelling_config = {"spelling_correction": correction_config(args.spelling_distance)}
    seed = int(tagger.config.get("seed", settings.seed))
    decided_on = val_decision_sample(len(val_rows), seed)
    rows = val_rows.iloc[decided_on].reset_index(drop=True)
    embeddings = split_embeddings(tagger, args.artifact, rows, settings)
    truth = tagger.label_maps[PRIMARY_HEAD].encode(rows[PRIMARY_HEAD])
    blend, report = choose_primary_blend(tagger.model, tagger.image_expert, tagger.text_expert, rows, tagger.text,
                                         embeddings, truth, settings.inference_batch_size, seed,
                                         spelling=corrector_for(spelling_config, tagger.text.vocabulary,
                                                                text_expert_words(tagger.text_expert)))

    out = args.out / tagger.version
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(args.artifact, out)
    config = {**tagger.config, **blend_config(blend, report), **spelling_config}
    write_config(out, config)
    calibrate_chosen_model(out, settings, rows, embeddings, train_labels)

    result = {"artifact": str(args.artifact), "copy": str(out), "model_version": tagger.version,
              "val_decision_products": len(rows), "trained_blend": tagger.config.get("primary_blend"),
              "trained_text_condition_thresholds": tagger.config.get("text_condition_thresholds"),
              "trained_spelling_correction": tagger.config.get("spelling_correction"), **spelling_config,
              "blend": blend, "text_condition_thresholds": config["text_condition_thresholds"],
              "text_conditions": report.get("text_conditions"), "seconds": round(time.perf_counter() - started, 1)}
    print(f"{'condition':<12} {'threshold':>9}  {'copy':<8} {'situation':<10} {'before':>7} {'after':>7}")
    for name, entry in (report.get("text_conditions") or {}).items():
        for key, before in entry["before"].items():
            situation, copy = key.rsplit("_", 1)
            print(f"{name:<12} {entry['threshold']!s:>9}  {copy:<8} {situation:<10} {before:7.4f} "
                  f"{entry['after'][key]:7.4f}")
    out_json = ROOT / "benchmarks" / "results" / "blend_choice.json"
    out_json.write_text(json.dumps(result, indent=1, default=float))
    print(f"blend {blend}\nwrote {out_json} and {out}")


if __name__ == "__main__":
    main()
