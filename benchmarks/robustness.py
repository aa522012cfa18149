"""Robustness: articleType accuracy on the ``test`` split (or ``val``) under perturbed titles, descriptions and photos.

A shop's inputs are not this catalog's clean ones. Each perturbation family of
``fashion_tagging/augment.py`` is applied at several strengths, to the texts (photos clean) or
to the photos (texts clean), and the trained model is scored in its three modality settings
(fused, text only, image only, ``model.modality_view``) next to a scikit-learn reference, a
TF-IDF (words 1-2 + characters 2-5) linear SVM trained on ``train`` with C chosen on ``val``.

Every product's perturbation depends only on ``--seed``, the family, the strength and the product
id (rotations alternate sign by position), never on the model: runs under different ``--label`` s
("before", "after") see the same perturbed inputs, and ``benchmarks/results/robustness.json``
keeps one entry per label side by side. Photos are perturbed at their own resolution, then resized
to the model's input as tagging does; the backbone runs on the tagger's engine (LiteRT on a CPU).

    .venv/bin/python benchmarks/robustness.py --artifact <model dir> --label before [--limit N] [--seed 0]

Prints a table and writes (replacing only this label's entry) ``benchmarks/results/robustness.json``.
``--limit`` and ``--reference-limit`` (the reference's train/val products) are for development and
are recorded, as is ``--families`` (only those families and clean, e.g. the text ones to compare two
blends of one model in minutes); ``--engine keras`` scores with the Keras backbone (``evaluate``'s embeddings) instead.
``--split val`` scores ``val`` instead, for choices made before the one final look at ``test``: it
writes ``benchmarks/results/robustness_val.json`` and, with ``--no-reference``, skips the reference.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fashion_tagging import augment  # noqa: E402
from fashion_tagging.catalog import product_text  # noqa: E402
from fashion_tagging.images import ImageDecodeError, open_photo, read_photo_file, to_model_size  # noqa: E402
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "robustness.json"
RESULTS_BY_SPLIT = {"test": RESULTS, "val": ROOT / "benchmarks" / "results" / "robustness_val.json"}
EMBED_BATCH = 64
PREDICT_BATCH = 256
REFERENCE_C = (0.3, 1.0, 3.0)  # val accuracy 0.9701 / 0.9751 / 0.9762 on this catalog (a first run's log)
# (family, what it perturbs, strengths). A family's position here seeds its randomness: append new
# families at the end, or earlier runs' perturbations are no longer the ones a new run sees.
FAMILIES = (
    ("clean", None, (None,)),
    ("spelling", "text", (0.1, 0.33, 0.5)),  # share of words with a typo, title and description
    ("missing_title", "text", (None,)),  # description only
    ("missing_description", "text", (None,)),  # title only
    ("shuffled_title", "text", (None,)),  # title words in a random order
    ("word_dropout", "text", (0.3,)),  # share of words removed, title and description
    ("rotation", "image", (5, 10, 15)),  # degrees, +d at even positions, -d at odd ones
    ("crop", "image", (0.9, 0.8)),  # share of each side kept, centred
    ("jpeg", "image", (30, 10)),  # re-encoding quality
    ("grayscale", "image", (None,)),
    ("low_resolution", "image", (2, 3)),  # down-sampling factor, then back up
)
MODEL_SETTINGS = ("fused", "text_only", "image_only")
# The targets, checked on each run.
FUSED_CLEAN_MIN = 0.977
IMAGE_ONLY_CLEAN_MIN = 0.885
SPELLING_FUSED_MAX_DROP = ("spelling", 0.33, 1.0)  # points
MISSING_TITLE_FUSED_MAX_DROP = ("missing_title", None, 3.0)
MILD_IMAGE_MAX_DROP = 2.0  # image-only points, for each of:
MILD_IMAGE_SETTINGS = (("rotation", 5), ("rotation", 10), ("crop", 0.9), ("crop", 0.8), ("jpeg", 10))


# --- perturbations ----------------------------------------------------------------------------------


def perturbed_text(family: str, strength, title: str, description: str, rng: np.random.Generator) -> str:
    """One product's model text (``catalog.product_text``) with ``family`` applied to its parts."""
    if family == "spelling":
        title, description = augment.misspell(title, strength, rng), augment.misspell(description, strength, rng)
    elif family == "missing_title":
        title = ""
    elif family == "missing_description":
        description = ""
    elif family == "shuffled_title":
        title = augment.shuffle_words(title, rng)
    elif family == "word_dropout":
        title, description = augment.drop_words(title, strength, rng), augment.drop_words(description, strength, rng)
    elif family != "clean":
        raise ValueError(f"not a text family: {family!r}")
    return product_text(title, description)


def perturbed_photo(family: str, strength, image, position: int):
    """One decoded photo (PIL, own resolution) with ``family`` applied; ``position`` sets a rotation's sign."""
    if family == "rotation":
        return augment.rotate(image, strength if position % 2 == 0 else -strength)
    if family == "crop":
        return augment.crop(image, strength)
    if family == "jpeg":
        return augment.jpeg(image, int(strength))
    if family == "grayscale":
        return augment.grayscale(image)
    if family == "low_resolution":
        return augment.low_resolution(image, strength)
    if family == "clean":
        return image
    raise ValueError(f"not an image family: {family!r}")


def product_rng(seed: int, family_index: int, strength_index: int, product_id) -> np.random.Generator:
    """The generator of one product's perturbation: the same for every model scored."""
    return np.random.default_rng([seed, family_index, strength_index, int(product_id)])


def setting_texts(rows, family: str, strength, family_index: int, strength_index: int, seed: int) -> list[str]:
    """The rows' model texts under one text setting."""
    titles = rows["productDisplayName"].fillna("").tolist()
    descriptions = rows["description"].fillna("").tolist()
    return [perturbed_text(family, strength, title, description, product_rng(seed, family_index, strength_index, pid))
            for title, description, pid in zip(titles, descriptions, rows["id"], strict=True)]


# --- photos -----------------------------------------------------------------------------------------


def decode(path):
    """A product's photo as an upright RGB PIL image at its own resolution, None without a usable one."""
    if not isinstance(path, str) or not path:  # no photo: an empty or missing (NaN) path
        return None
    try:
        return open_photo(read_photo_file(path))
    except ImageDecodeError:
        return None


def usable_photos(paths: list) -> tuple[np.ndarray, int]:
    """Positions of the products with a decodable photo, and how many had a photo file that failed."""
    usable, failed = [], 0
    for position, path in enumerate(paths):
        image = decode(path)
        if image is not None:
            usable.append(position)
        elif isinstance(path, str) and path:
            failed += 1
    return np.asarray(usable, dtype=int), failed


def embed_setting(tagger, paths: list, usable: np.ndarray, family: str, strength) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1280) embeddings and the has-image mask of the rows' photos under one image setting.

    Photos are decoded and perturbed a batch ahead in worker threads while the backbone embeds
    the current batch; every batch but the last holds ``EMBED_BATCH`` photos.
    """
    from tqdm import tqdm

    size = tagger.image_size

    def prepare(positions):
        pixels = [to_model_size(np.asarray(perturbed_photo(family, strength, decode(paths[p]), int(p))), size)
                  for p in positions]
        return np.stack(pixels).astype(np.float32)

    vectors = np.zeros((len(paths), IMAGE_EMBEDDING_DIM), dtype=np.float32)
    has_image = np.zeros(len(paths), dtype=bool)
    batches = [usable[start:start + EMBED_BATCH] for start in range(0, len(usable), EMBED_BATCH)]
    with ThreadPoolExecutor(2) as pool, tqdm(total=len(usable), desc=f"{family} {strength or ''}".strip(),
                                              unit="photo", leave=False, mininterval=10) as bar:
        pending = collections.deque(pool.submit(prepare, batch) for batch in batches[:2])
        for index, batch in enumerate(batches):
            pixels = pending.popleft().result()
            if index + 2 < len(batches):
                pending.append(pool.submit(prepare, batches[index + 2]))
            vectors[batch] = np.asarray(tagger.embed_pixels(pixels), dtype=np.float32)
            has_image[batch] = True
            bar.update(len(batch))
    return vectors, has_image


# --- scoring ----------------------------------------------------------------------------------------


def model_accuracies(tagger, vectors, has_image, texts, truth, labelled, settings) -> dict[str, float]:
    """articleType accuracy over the labelled rows for each modality setting in ``settings``."""
    from fashion_tagging.model import modality_view

    scores = {}
    for setting in settings:  # the names of model.MODES
        view = modality_view(setting, vectors, has_image, texts)
        predicted = tagger.predict_embeddings(*view, batch_size=PREDICT_BATCH).labels[tagger.primary_head]
        scores[setting] = float(np.mean(np.asarray(predicted, dtype=object)[labelled] == truth[labelled]))
    return scores


def fit_reference(train_texts: list[str], train_labels, val_texts: list[str], val_labels,
                  grid=REFERENCE_C) -> tuple[object, dict]:
    """The TF-IDF linear SVM, C chosen on val accuracy; returns (vectorizer + SVM, what was chosen).

    The vectorizer does not depend on C: it is fitted once, and one SVM per C on its matrix.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    started = time.perf_counter()
    vectorizer = make_union(
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2))
    features = vectorizer.fit_transform(train_texts)
    vectorize_seconds = time.perf_counter() - started
    val_features = vectorizer.transform(val_texts)
    val_has_text = np.array([bool(t.strip()) for t in val_texts])
    accuracies, fitted, fit_seconds = {}, {}, {}
    for c in grid:
        tick = time.perf_counter()
        fitted[c] = LinearSVC(C=c, random_state=0).fit(features, train_labels)
        fit_seconds[c] = time.perf_counter() - tick
        predicted = np.where(val_has_text, fitted[c].predict(val_features), "")
        accuracies[c] = float(np.mean(predicted == val_labels))
        print(f"  reference C={c}: val accuracy {accuracies[c]:.4f} (SVM fit {fit_seconds[c]:.0f} s)", flush=True)
    best = max(grid, key=lambda c: (accuracies[c], -c))  # a tie goes to the smaller C
    info = {"C": best, "val_accuracy_per_C": {str(c): round(a, 5) for c, a in accuracies.items()},
            "fit_seconds": round(vectorize_seconds + fit_seconds[best], 1),
            "vectorizer_fit_seconds": round(vectorize_seconds, 1),
            "svm_fit_seconds_per_C": {str(c): round(s, 1) for c, s in fit_seconds.items()},
            "train_products": len(train_texts), "val_products": len(val_texts),
            "features": int(features.shape[1])}
    return make_pipeline(vectorizer, fitted[best]), info


def train_reference(products, heads, limit: int | None = None, grid=REFERENCE_C) -> tuple[object, dict]:
    """The reference fitted on the catalog's ``train`` split and tuned on ``val`` (``limit``: the
    first N products of each, for development)."""
    from fashion_tagging.catalog import with_clean_labels

    data = []
    for split in ("train", "val"):
        frame = with_clean_labels(products[products["split"] == split].reset_index(drop=True), heads)
        data.extend(labelled_texts(frame.iloc[:limit] if limit else frame))
    reference, info = fit_reference(*data, grid=grid)
    return reference, {**info, "limit": limit}


def reference_accuracy(reference, texts: list[str], truth, labelled) -> float:
    """The reference's articleType accuracy; a product without text is predicted "" (wrong)."""
    has_text = np.array([bool(t.strip()) for t in texts])
    predicted = np.full(len(texts), "", dtype=object)
    if has_text.any():
        predicted[has_text] = reference.predict([t for t, keep in zip(texts, has_text, strict=True) if keep])
    return float(np.mean(predicted[labelled] == truth[labelled]))


def labelled_texts(frame) -> tuple[list[str], np.ndarray]:
    """Texts and articleType labels of the rows with both (the reference's training data)."""
    texts = frame["text"].fillna("").tolist()
    labels = frame["articleType"].to_numpy(dtype=object)
    keep = np.array([bool(t.strip()) for t in texts]) & (labels != "")
    return [t for t, k in zip(texts, keep, strict=True) if k], labels[keep].astype(str)


def setting_key(family: str, strength) -> str:
    return f"{family}:{'' if strength is None else strength}"


def score_settings(tagger, rows, paths: list, usable: np.ndarray, reference, seed: int,
                   reference_scores: dict | None = None, families: list[str] | None = None) -> list[dict]:
    """Every (family, strength) of ``FAMILIES`` (or of ``families`` and clean) scored in the three
    modality settings and by the reference.

    Clean goes first: its embeddings serve the text families, its figures the settings a family
    leaves unchanged (listed in ``same_as_clean``). ``reference_scores`` ({setting_key: accuracy}):
    the reference's figures from an earlier run on the same perturbed texts (it does not depend
    on the model), used instead of ``reference``.
    """
    assert FAMILIES[0][0] == "clean", "clean must be scored first"
    truth = rows[tagger.primary_head].to_numpy(dtype=object)
    labelled = truth != ""
    clean_texts = rows["text"].fillna("").tolist()
    plan = [(fi, family, perturbs, si, strength) for fi, (family, perturbs, strengths) in enumerate(FAMILIES)
            for si, strength in enumerate(strengths) if family == "clean" or families is None or family in families]
    results, clean, clean_images = [], None, None
    for number, (fi, family, perturbs, si, strength) in enumerate(plan, start=1):
        tick = time.perf_counter()
        if perturbs == "text":
            texts, (vectors, has_image) = setting_texts(rows, family, strength, fi, si, seed), clean_images
            scored, reused = ("fused", "text_only"), ["image_only"]
        elif perturbs == "image":
            texts, (vectors, has_image) = clean_texts, embed_setting(tagger, paths, usable, family, strength)
            scored, reused = ("fused", "image_only"), ["text_only", "tfidf_svm"]
        else:
            texts, (vectors, has_image) = clean_texts, embed_setting(tagger, paths, usable, family, strength)
            scored, reused, clean_images = MODEL_SETTINGS, [], (vectors, has_image)
        scores = model_accuracies(tagger, vectors, has_image, texts, truth, labelled, scored)
        if "tfidf_svm" not in reused and (reference is not None or reference_scores):
            key = setting_key(family, strength)
            scores["tfidf_svm"] = reference_scores[key] if reference_scores and key in reference_scores \
                else reference_accuracy(reference, texts, truth, labelled)
        if clean is None:
            clean = scores
        scores.update({name: clean[name] for name in reused if name in clean})
        extra = {"same_as_clean": reused} if reused else {}
        extra.update(products_with_text=sum(bool(t.strip()) for t in texts), products_with_image=int(has_image.sum()),
                     seconds=round(time.perf_counter() - tick, 1))
        entry = setting_entry(family, strength, perturbs, scores, clean, extra)
        results.append(entry)
        print(f"[{number}/{len(plan)}] {family} {'' if strength is None else strength}: fused {entry['fused']:.4f} "
              f"text-only {entry['text_only']:.4f} image-only {entry['image_only']:.4f} "
              f"TF-IDF {entry['tfidf_svm']:.4f} ({entry['seconds']:.0f} s)", flush=True)
    return results


# --- results ----------------------------------------------------------------------------------------


def setting_entry(family: str, strength, perturbs, scores: dict, clean: dict, extra: dict) -> dict:
    """One setting's JSON entry: accuracies (rounded), each one's drop from clean in points
    (positive: worse), then ``extra`` (counts, timing)."""
    names = [name for name in (*MODEL_SETTINGS, "tfidf_svm") if name in scores]
    return {"family": family, "strength": strength, "perturbs": perturbs,
            **{name: round(scores[name], 5) for name in names},
            **{f"drop_{name}_points": round(100 * (clean[name] - scores[name]), 3) for name in names},
            **extra}


def find(settings: list[dict], family: str, strength) -> dict | None:
    return next((s for s in settings if s["family"] == family and s["strength"] == strength), None)


def run_checks(settings: list[dict]) -> dict[str, bool]:
    """The issue's targets on one run's settings (those of families the run did not score are left out)."""
    clean = find(settings, "clean", None)
    checks = {f"fused_clean_ge_{FUSED_CLEAN_MIN}": clean["fused"] >= FUSED_CLEAN_MIN,
              f"image_only_clean_ge_{IMAGE_ONLY_CLEAN_MIN}": clean["image_only"] >= IMAGE_ONLY_CLEAN_MIN}
    for family, strength, points in (SPELLING_FUSED_MAX_DROP, MISSING_TITLE_FUSED_MAX_DROP):
        name = f"{family}{'' if strength is None else f'_{strength}'}_fused_drop_le_{points:g}_points"
        if find(settings, family, strength):
            checks[name] = find(settings, family, strength)["drop_fused_points"] <= points
    mild = []
    for family, strength in MILD_IMAGE_SETTINGS:
        if find(settings, family, strength):
            passed = find(settings, family, strength)["drop_image_only_points"] <= MILD_IMAGE_MAX_DROP
            checks[f"{family}_{strength}_image_only_drop_le_{MILD_IMAGE_MAX_DROP:g}_points"] = passed
            mild.append(passed)
    if len(mild) == len(MILD_IMAGE_SETTINGS):
        checks[f"mild_image_perturbations_image_only_drop_le_{MILD_IMAGE_MAX_DROP:g}_points"] = all(mild)
    if any("tfidf_svm" not in s for s in settings):  # scored without the reference
        return checks
    checks["fused_beats_tfidf_everywhere"] = all(s["fused"] > s["tfidf_svm"] for s in settings)
    checks["text_only_beats_tfidf_where_text"] = all(s["text_only"] > s["tfidf_svm"] for s in settings
                                                     if s["perturbs"] != "image")
    return checks


def read_results(path: Path = RESULTS) -> dict:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"warning: {path} is not JSON; starting it afresh", file=sys.stderr)
    return {}


def write_run(label: str, run: dict, reference: dict | None, path: Path = RESULTS) -> None:
    """Replace ``label``'s entry in the results file (the other labels kept) and the reference's
    figures (unless None), atomically."""
    existing = read_results(path)
    if reference is not None:
        existing["reference"] = reference
    runs = dict(existing.get("runs") or {})
    runs[label] = run
    from fashion_tagging.artifacts import write_file_atomically

    write_file_atomically(path, (json.dumps({**existing, "runs": runs}, indent=1) + "\n").encode())


def print_table(label: str, run: dict) -> None:
    """The run's settings as a Markdown table, then its checks."""
    limited = "" if run["limit"] is None else f", --limit {run['limit']}"
    print(f"\n{label}: model {run['model_version']} ({run['image_size']}px, {run['engine']}), seed {run['seed']}, "
          f"{run['labelled_products']} labelled {run['split']} products ({run['products_with_image']} with a photo, "
          f"{run['products_with_text']} with a text){limited}\n")
    names = [name for name in (*MODEL_SETTINGS, "tfidf_svm") if name in run["settings"][0]]
    titles = {"fused": "fused", "text_only": "text only", "image_only": "image only", "tfidf_svm": "TF-IDF SVM"}
    print(f"| family | strength | {' | '.join(titles[n] for n in names)} | {' | '.join('Δ ' + titles[n] for n in names)} |")
    print("| --- | --- |" + " --- |" * (2 * len(names)))
    for s in run["settings"]:
        reused = set(s.get("same_as_clean", ()))
        cells = [f"{s[name]:.4f}{'*' if name in reused else ''}" for name in names]
        drops = [f"{s[f'drop_{name}_points']:+.2f}" for name in names]
        strength = "" if s["strength"] is None else s["strength"]
        print(f"| {s['family']} | {strength} | {' | '.join(cells)} | {' | '.join(drops)} |")
    print("\nΔ: drop from clean in points (positive: worse). *: input unchanged by the family, the clean figure.")
    reference = run["reference"]
    if reference is not None:
        print(f"TF-IDF SVM: C={reference['C']} (val {reference['val_accuracy_per_C']}), fit {reference['fit_seconds']} s")
    print("\nchecks:")
    for name, passed in run["checks"].items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")


# --- main -------------------------------------------------------------------------------------------


def main() -> int:
    from fashion_tagging.engines import ENGINE_CHOICES, FLOAT32, INT8

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="a trained model artifact directory")
    parser.add_argument("--label", required=True, help="this run's name in the results file (e.g. before, after)")
    parser.add_argument("--seed", type=int, default=0, help="perturbation seed (keep it across labels)")
    parser.add_argument("--limit", type=int, help="only the first N test products (development only)")
    parser.add_argument("--reference-limit", type=int,
                        help="train/tune the TF-IDF reference on the first N train and val products (development only)")
    parser.add_argument("--reference-c", type=float, nargs="+", default=list(REFERENCE_C),
                        help="the reference's C grid, chosen among on val (one value: no choice, minutes saved)")
    parser.add_argument("--reference-model", type=Path,
                        help="a file for the fitted reference (joblib): loaded when it exists, else written, so "
                             "runs of several models fit it once")
    parser.add_argument("--families", nargs="+", choices=[f for f, _, _ in FAMILIES if f != "clean"],
                        help="score only these families (and clean); recorded, and the checks of the others are "
                             "left out (default: all)")
    parser.add_argument("--split", choices=tuple(RESULTS_BY_SPLIT), default="test",
                        help="the split scored (val: for choices; its own results file)")
    parser.add_argument("--no-reference", action="store_true", help="skip the TF-IDF reference (minutes saved)")
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="auto", help="where the backbone runs")
    parser.add_argument("--quantization", choices=(FLOAT32, INT8),
                        help="LiteRT export to run (default: the one training shipped)")
    args = parser.parse_args()

    from fashion_tagging.artifacts import Tagger
    from fashion_tagging.catalog import load_kaggle_catalog, with_clean_labels
    from fashion_tagging.engines import serving_quantization
    from fashion_tagging.settings import get_settings

    started = time.perf_counter()
    settings = get_settings()
    tagger = Tagger.load(args.artifact, engine=args.engine, quantization=args.quantization)
    products = load_kaggle_catalog(settings.data_dir).products
    rows = with_clean_labels(products[products["split"] == args.split].reset_index(drop=True), tagger.heads)
    if args.limit is not None:
        rows = rows.iloc[:args.limit].reset_index(drop=True)
    labelled = rows[tagger.primary_head].to_numpy(dtype=object) != ""
    paths = rows["image_path"].tolist()
    print(f"model {tagger.version} on {len(rows)} {args.split} products ({int(labelled.sum())} labelled), "
          f"engine {tagger.engine}", flush=True)

    # The reference depends on the perturbed texts only: an earlier run's figures on the same
    # inputs are reused rather than refitted (minutes per C).
    inputs_key = {"seed": args.seed, "limit": args.limit, "reference_limit": args.reference_limit,
                  "reference_c": args.reference_c}
    results_path = RESULTS_BY_SPLIT[args.split]
    saved = read_results(results_path).get("reference") or {}
    reference, reference_scores, reference_info = None, None, None
    every_setting = {setting_key(family, strength) for family, _, strengths in FAMILIES for strength in strengths}
    if args.no_reference:
        print("TF-IDF reference: skipped (--no-reference)", flush=True)
    elif saved.get("inputs") == inputs_key and every_setting <= set(saved.get("scores") or ()):
        reference_info, reference_scores = saved["info"], saved["scores"]
        print("TF-IDF reference: figures of an earlier run on the same inputs", flush=True)
    elif args.reference_model and args.reference_model.is_file():
        import joblib

        reference, reference_info = joblib.load(args.reference_model)
        print(f"TF-IDF reference: loaded from {args.reference_model}", flush=True)
    else:
        print("fitting the TF-IDF reference", flush=True)
        reference, reference_info = train_reference(products, tagger.heads, args.reference_limit, args.reference_c)
        if args.reference_model:
            import joblib

            joblib.dump((reference, reference_info), args.reference_model)

    usable, decode_failures = usable_photos(paths)
    results = score_settings(tagger, rows, paths, usable, reference, args.seed, reference_scores, args.families)

    run = {
        "model_version": tagger.version, "artifact": str(args.artifact.resolve()), "image_size": tagger.image_size,
        "split": args.split, "seed": args.seed, "limit": args.limit, "families": args.families or "all",
        "products": len(rows), "labelled_products": int(labelled.sum()),
        "products_with_image": int(len(usable)), "photo_decode_failures": decode_failures,
        "products_with_text": results[0]["products_with_text"],
        "engine": tagger.engine,
        "quantization": (args.quantization or serving_quantization(tagger.artifact_dir))
        if tagger.engine == "litert" else None,
        "cpu_count": os.cpu_count(), "seconds": round(time.perf_counter() - started, 1),
        "notes": "Accuracy over every labelled product of the split in each setting (a product without a photo or "
                 "text is still scored). same_as_clean: figures whose inputs the family leaves unchanged "
                 "(image only under text families, text only and the TF-IDF SVM under image families), "
                 "copied from clean. The TF-IDF SVM counts a product without text as wrong.",
        "settings": results,
        "reference": reference_info,
    }
    run["checks"] = run_checks(results)
    reference_entry = None if args.no_reference else {
        "inputs": inputs_key, "info": reference_info,
        "scores": {**(reference_scores or {}),
                   **{setting_key(r["family"], r["strength"]): r["tfidf_svm"] for r in results}}}
    write_run(args.label, run, reference_entry, results_path)
    print_table(args.label, run)
    print(f"\n{run['seconds']:.0f} s; wrote {results_path} (runs: {args.label!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
