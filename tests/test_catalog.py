"""The Kaggle-layout loader: real rows load, bad rows are reported with their reason."""

from fashion_tagging.catalog import clean_html, description_in_text, load_kaggle_catalog, product_text, stable_splits
from tests.fixtures_data import CORRUPT_IMAGE_ID, SLICE_PER_SPLIT


def test_loads_real_products_and_reports_every_bad_row(kaggle_slice_dir):
    load = load_kaggle_catalog(kaggle_slice_dir)
    products = load.products
    assert len(products) == sum(SLICE_PER_SPLIT.values()) + 1  # + the product with a corrupt photo
    assert products["id"].is_unique
    assert set(products["split"].dropna()) == {"train", "val", "test"}
    reasons = sorted(error.reason for error in load.errors)
    assert len(reasons) == 5, reasons
    assert "missing product id" in reasons
    assert any(r.startswith("product id is not an integer") for r in reasons)
    assert "missing product title" in reasons
    assert any(r.startswith("expected 10 fields, found 3") for r in reasons)
    assert any(r.startswith("duplicate product id") for r in reasons)
    assert all(error.source.startswith("styles.csv#row") for error in load.errors)
    # The duplicate keeps the first occurrence, not the appended "Duplicate" row.
    assert "Duplicate" not in set(products["productDisplayName"])
    corrupt = products.set_index("id").loc[CORRUPT_IMAGE_ID]
    assert corrupt["image_path"].endswith(f"{CORRUPT_IMAGE_ID}.jpg")


def test_descriptions_are_cleaned_html_and_text_starts_with_title(kaggle_slice_dir):
    products = load_kaggle_catalog(kaggle_slice_dir).products
    assert not products["description"].str.contains("<p>|&nbsp;|<br", regex=True).any()
    row = products.iloc[0]
    assert row["text"].startswith(row["productDisplayName"])


def test_clean_html_and_product_text():
    assert clean_html("<p>Blue&nbsp;tee<br/>100% cotton</p>") == "Blue tee 100% cotton"
    assert clean_html(None) == ""
    assert product_text("Nike Tee", "") == "Nike Tee"
    assert product_text("", "") == ""
    # the description part of a model text: the title and its separator removed, else the text whole
    assert description_in_text(product_text("Nike Tee", "Blue cotton tee"), "Nike Tee") == "Blue cotton tee"
    assert description_in_text(product_text("Nike Tee", ""), "Nike Tee") == "Nike Tee"
    assert description_in_text(product_text("", "Blue cotton tee"), "") == "Blue cotton tee"


def test_a_catalog_without_split_csv_gets_a_stable_split(kaggle_slice_dir, tmp_path):
    import shutil

    folder = tmp_path / "no-split"
    shutil.copytree(kaggle_slice_dir, folder, ignore=shutil.ignore_patterns("split.csv", "images"))
    first = load_kaggle_catalog(folder).products.set_index("id")["split"]
    again = load_kaggle_catalog(folder).products.set_index("id")["split"]

    assert first.equals(again)  # re-reading (or a grown catalog) never moves a product between splits
    assert set(first.dropna()) == {"train", "val", "test"}
    assert (first == "train").mean() > 0.6
    assert stable_splits([7, 8], [False, True])[0] is None  # no label: not a training product
