"""Fixtures: small real slices of the Kaggle catalog in ``../shared`` (never copied into the repo).

``kaggle_slice_dir`` is a Kaggle-layout folder of ~300 real products (train/val/test), with a
few deliberately broken rows and files appended so loaders are exercised on bad input.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fashion_tagging.settings import get_settings

DATA_DIR = get_settings().data_dir
SLICE_PER_SPLIT = {"train": 200, "val": 50, "test": 50}
# Broken input appended to the slice: what the loader must report, not drop silently.
BAD_STYLE_ROWS = [
    ["", "Men", "Apparel", "Topwear", "Tshirts", "Blue", "Summer", "2012", "Casual", "Row without id"],
    ["abc", "Men", "Apparel", "Topwear", "Tshirts", "Blue", "Summer", "2012", "Casual", "Non-integer id"],
    ["9999999", "Men", "Apparel", "Topwear", "Tshirts", "Blue", "Summer", "2012", "Casual", ""],
    ["9999998", "Men", "Apparel"],
]
CORRUPT_IMAGE_ID = 9999997


def require_data() -> None:
    if not (DATA_DIR / "styles.csv").is_file():
        pytest.skip(f"real catalog not found at {DATA_DIR}")


def slice_ids() -> list[int]:
    """The same real products every run: the first N of each split, most frequent classes first."""
    split = pd.read_csv(DATA_DIR / "split.csv")
    styles = pd.read_csv(DATA_DIR / "styles.csv", usecols=["id", "articleType"])
    frequent = styles["articleType"].value_counts().index[:12]
    rows = split.merge(styles, on="id")
    rows = rows[rows["articleType"].isin(frequent)]
    return sorted(int(i) for name, n in SLICE_PER_SPLIT.items() for i in rows[rows["split"] == name]["id"].head(n))


def write_kaggle_slice(target: Path, ids: list[int], *, with_bad_rows: bool = True) -> Path:
    """Copy the given products (rows + images) into a Kaggle-layout folder."""
    (target / "images").mkdir(parents=True, exist_ok=True)
    wanted = set(ids)
    for name in ("styles.csv", "descriptions.csv", "split.csv"):
        with (DATA_DIR / name).open(newline="", encoding="utf-8") as src, (target / name).open("w", newline="", encoding="utf-8") as dst:
            reader, writer = csv.reader(src), csv.writer(dst)
            writer.writerow(next(reader))
            writer.writerows(row for row in reader if row and row[0].isdigit() and int(row[0]) in wanted)
    for pid in ids:
        source = DATA_DIR / "images" / f"{pid}.jpg"
        if source.is_file():
            shutil.copyfile(source, target / "images" / f"{pid}.jpg")
    if with_bad_rows:
        first = ids[0]
        with (target / "styles.csv").open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerows(BAD_STYLE_ROWS)
            writer.writerow([first, "Men", "Apparel", "Topwear", "Tshirts", "Red", "Summer", "2012", "Casual", "Duplicate"])
            writer.writerow([CORRUPT_IMAGE_ID, "Women", "Apparel", "Topwear", "Tops", "Red", "Summer", "2012", "Casual",
                             "Product whose photo is corrupt"])
        (target / "images" / f"{CORRUPT_IMAGE_ID}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return target


@pytest.fixture(scope="session")
def kaggle_slice_dir(tmp_path_factory) -> Path:
    """~300 real products in Kaggle layout plus broken rows and one corrupt image."""
    require_data()
    return write_kaggle_slice(tmp_path_factory.mktemp("kaggle-slice"), slice_ids())


@pytest.fixture(scope="session")
def ft_home(tmp_path_factory) -> Path:
    """A state directory for the session; converted backbone weights are cached there once."""
    home = tmp_path_factory.mktemp("ft-home")
    os.environ["FT_HOME"] = str(home)
    return home
