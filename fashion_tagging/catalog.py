"""Reading a catalog in the Kaggle "Fashion Product Images" layout.

``styles.csv`` (one row per product), ``images/<id>.jpg`` (or ``.jpeg`` / ``.png``, any size),
optional ``descriptions.csv`` (raw HTML) and ``split.csv``. Any head column (``settings.HEADS``)
may be absent or empty, and labels are whatever names the catalog uses: training builds only
the heads its labels support. Bad rows are never dropped silently and never fatal: each becomes
a :class:`RowError` with its reason, and every good row still loads.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pandas as pd

from fashion_tagging.errors import RowError
from fashion_tagging.settings import HEADS

STYLE_COLUMNS = (
    "id", "gender", "masterCategory", "subCategory", "articleType",
    "baseColour", "season", "year", "usage", "productDisplayName",
)
REQUIRED_COLUMNS = ("id", "productDisplayName")
MAX_PRODUCT_ID = 2**63 - 1  # products.product_id is a bigint
# Photo files looked for, in this order; the decoders read the format from the bytes, not the name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
_TAG_RE = re.compile(r"<[^>]+>")
_BREAK_RE = re.compile(r"<\s*(br|/p|/li|/div|/h\d)\s*/?\s*>", re.IGNORECASE)
_SPACE_RE = re.compile(r"\s+")


@dataclasses.dataclass
class CatalogLoad:
    """Good products (indexed by nothing, ``id`` is a column) plus the rows that were rejected."""

    products: pd.DataFrame
    errors: list[RowError]


def clean_html(raw: str | None) -> str:
    """Shop descriptions are raw HTML: keep the words, drop tags and entities, collapse spaces."""
    if not raw or not isinstance(raw, str):
        return ""
    text = _BREAK_RE.sub(" ", raw)
    text = _TAG_RE.sub(" ", text)
    text = html.unescape(text).replace("\xa0", " ")
    return _SPACE_RE.sub(" ", text).strip()


TEXT_SEPARATOR = " . "  # between a model text's title and description


def product_text(title: str | None, description: str | None) -> str:
    """Model text: the title first (most informative, never truncated away), then the description."""
    parts = [p.strip() for p in (title or "", description or "") if isinstance(p, str) and p.strip()]
    return TEXT_SEPARATOR.join(parts)


def description_in_text(text: str, title: str | None) -> str:
    """The description part of a model text built from ``title`` (``product_text``); a text
    without both parts comes back whole."""
    head = product_text(title, None) + TEXT_SEPARATOR
    return text[len(head):] if head != TEXT_SEPARATOR and text.startswith(head) else text


SPLIT_SHARES = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def stable_splits(ids, labelled=None) -> list[str | None]:
    """train/val/test (80/10/10) for a catalog without ``split.csv``, from a hash of each product id.

    A product keeps its split however the catalog grows or is re-read, so test products never
    leak into a later training run. Products without a label (``labelled`` False) get none.
    """
    labelled = [True] * len(ids) if labelled is None else list(labelled)
    splits: list[str | None] = []
    for product_id, has_label in zip(ids, labelled, strict=True):
        if not has_label:
            splits.append(None)
            continue
        draw = int.from_bytes(hashlib.blake2b(str(int(product_id)).encode(), digest_size=8).digest(), "big") / 2**64
        cumulative = 0.0
        for name, share in SPLIT_SHARES:
            cumulative += share
            if draw < cumulative:
                splits.append(name)
                break
        else:
            splits.append(SPLIT_SHARES[-1][0])
    return splits


def with_clean_labels(frame: pd.DataFrame, heads=HEADS) -> pd.DataFrame:
    """A copy of ``frame`` whose head columns are stripped strings, "" where there is no label.

    A catalog may lack a head's column (it becomes all "") or hold None/NaN in it: neither is
    a label. Which heads a model gets is decided from these labels at training time.
    """
    frame = frame.copy()
    for head in heads:
        values = frame[head] if head in frame.columns else [""] * len(frame)
        frame[head] = ["" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v).strip() for v in values]
    return frame


def validate_rows(frame: pd.DataFrame, source: str, *, row_offset: int = 2,
                  problems: list[str | None] | None = None) -> tuple[pd.DataFrame, list[RowError]]:
    """Split raw string rows into valid products and :class:`RowError` s.

    A row is rejected when its id is missing, not an integer or beyond a bigint, when its id
    repeats an earlier row (the first one wins), when ``problems`` (one entry per row) names one,
    or when it has no title. ``row_offset`` turns the frame position into the line number a
    person sees in the file (header + 1-based).
    """
    errors: list[RowError] = []
    keep: list[bool] = []
    seen: set[int] = set()
    ids: list[int | None] = []
    titles = frame["productDisplayName"] if "productDisplayName" in frame else pd.Series([""] * len(frame))
    for position, (raw_id, title) in enumerate(zip(frame["id"], titles, strict=True)):
        where = f"{source}#row{position + row_offset}"
        raw_id = "" if raw_id is None or (isinstance(raw_id, float) and pd.isna(raw_id)) else str(raw_id).strip()
        product_id = int(raw_id) if re.fullmatch(r"\d+", raw_id) else None
        if not raw_id:
            errors.append(RowError("missing product id", None, where))
        elif product_id is None:
            errors.append(RowError(f"product id is not an integer: {raw_id!r}", None, where))
        elif product_id > MAX_PRODUCT_ID:
            errors.append(RowError(f"product id is out of range (at most {MAX_PRODUCT_ID}): {raw_id!r}", None, where))
            product_id = None
        elif product_id in seen:
            errors.append(RowError(f"duplicate product id {product_id} (first occurrence kept)", product_id, where))
            product_id = None
        elif problems is not None and problems[position]:
            errors.append(RowError(problems[position], product_id, where))
            product_id = None
        elif not isinstance(title, str) or not title.strip():
            errors.append(RowError("missing product title", product_id, where))
            product_id = None
        if product_id is not None:
            seen.add(product_id)
        keep.append(product_id is not None)
        ids.append(product_id)
    valid = frame.loc[keep].copy()
    valid["id"] = [i for i, k in zip(ids, keep, strict=True) if k]
    return valid.reset_index(drop=True), errors


def parse_csv_rows(handle: TextIO, source: str, chunk_rows: int | None = None,
                   ) -> Iterator[tuple[pd.DataFrame, list[int], list[RowError]]]:
    """A CSV as string frames of ``chunk_rows`` rows (None: the whole file), each row with its line number.

    A line with the wrong number of fields becomes a :class:`RowError` (``<source>#row<n>``, the
    header being row 1), not a crash. Always yields at least once, so an empty file still shows its columns.
    """
    reader = csv.reader(handle)
    header = next(reader, None)
    if not header:
        raise ValueError("empty CSV (no header)")
    rows, numbers, errors = [], [], []
    for row_number, row in enumerate(reader, start=2):
        if len(row) != len(header):
            errors.append(RowError(f"expected {len(header)} fields, found {len(row)}", None, f"{source}#row{row_number}"))
        else:
            rows.append(row)
            numbers.append(row_number)
        if chunk_rows and len(rows) + len(errors) >= chunk_rows:
            yield pd.DataFrame(rows, columns=header, dtype=object), numbers, errors
            rows, numbers, errors = [], [], []
    yield pd.DataFrame(rows, columns=header, dtype=object), numbers, errors


def _read_csv_rows(path: Path) -> tuple[pd.DataFrame, list[RowError]]:
    """A whole CSV file as strings, plus its malformed lines as errors."""
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        frame, _, errors = next(parse_csv_rows(handle, path.name))
    return frame, errors


def find_image(images_dir: Path, product_id) -> str | None:
    """``images/<id>.jpg`` (or ``.jpeg`` / ``.png``, any size: photos are resized at load), None if absent."""
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{product_id}{suffix}"
        if path.is_file():
            return str(path)
    return None


def load_kaggle_catalog(data_dir: str | Path) -> CatalogLoad:
    """Load ``styles.csv`` + descriptions + split + image paths from a Kaggle-layout folder."""
    data_dir = Path(data_dir)
    styles_path = data_dir / "styles.csv"
    if not styles_path.is_file():
        raise FileNotFoundError(f"no styles.csv in {data_dir}: is this a Kaggle-layout catalog folder?")
    styles, errors = _read_csv_rows(styles_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in styles.columns]
    if missing:
        raise ValueError(f"{styles_path} lacks required columns {missing}")
    for column in STYLE_COLUMNS:
        if column not in styles.columns:
            styles[column] = ""
    products, row_errors = validate_rows(styles[list(STYLE_COLUMNS)], "styles.csv")
    errors.extend(row_errors)

    descriptions_path = data_dir / "descriptions.csv"
    if descriptions_path.is_file():
        descriptions, _ = _read_csv_rows(descriptions_path)
        descriptions = descriptions[descriptions["id"].str.fullmatch(r"\d+", na=False)]
        descriptions = descriptions.drop_duplicates("id").assign(id=lambda d: d["id"].astype("int64"))
        products = products.merge(descriptions[["id", "brandName", "description"]], on="id", how="left")
    else:
        products["brandName"] = ""
        products["description"] = ""
    products["description"] = products["description"].map(clean_html)
    products["brandName"] = products["brandName"].fillna("")

    split_path = data_dir / "split.csv"
    if split_path.is_file():
        split = pd.read_csv(split_path, dtype={"id": "int64", "split": str})
        products = products.merge(split.drop_duplicates("id"), on="id", how="left")
    else:
        labels = products["articleType"] if "articleType" in products.columns else [""] * len(products)
        products["split"] = stable_splits(products["id"], [isinstance(v, str) and bool(v.strip()) for v in labels])

    products["image_path"] = [find_image(data_dir / "images", pid) for pid in products["id"]]
    products["year"] = pd.to_numeric(products["year"], errors="coerce").astype("Int64")
    products = with_clean_labels(products)
    products["text"] = [product_text(t, d) for t, d in zip(products["productDisplayName"], products["description"], strict=True)]
    products["id"] = products["id"].astype("int64")
    return CatalogLoad(products=products.reset_index(drop=True), errors=errors)
