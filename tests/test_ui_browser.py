"""The Catalog tagging page in a real Airflow api-server, driven by a real headless Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver).
Airflow's metadata goes to the system PostgreSQL on 127.0.0.1:5432 when it answers (a fresh
database), else to the embedded test server; the catalog is a seeded database of the embedded
server (real products, synthetic registry/runs/tags/embeddings: v003 serving, a newer v004
promoted and half-way through its backfill); the object store is the shared data folder, read in place.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fashion_tagging import dashboard
from fashion_tagging.db.engine import engine_for_url, ensure_database
from fashion_tagging.settings import get_settings
from tests.airflow_api_server import (CHROMEDRIVER, CHROMIUM, AirflowApiServer, chromium, open_catalog_page,
                                      wait_images_loaded)
from tests.fixtures_services import drop_database, new_database
from tests.synthetic_catalog import catalog_products, seed_synthetic_catalog

SYSTEM_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
SCREENSHOT = Path(__file__).resolve().parent / "artifacts" / "catalog_tagging_page.png"
WAIT_S = 60
SEEDED_PRODUCTS = 200
BACKFILL_SHARE = 0.5
PAGE_PATH = "/catalog-tagging/"

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def seeded_catalog(postgres_url, tmp_path_factory):
    """(database URL, FT_HOME, products, serving version) of a seeded catalog with a backfill under way."""
    home = tmp_path_factory.mktemp("ft_home")
    url = new_database(postgres_url)
    products = catalog_products(get_settings().data_dir, SEEDED_PRODUCTS)
    version = seed_synthetic_catalog(engine_for_url(url), products, home / "models", backfill=BACKFILL_SHARE)
    yield url, home, products, version
    drop_database(postgres_url, url)


@pytest.fixture(scope="module")
def airflow_metadata_url(postgres_url):
    server = SYSTEM_POSTGRES if _answers("127.0.0.1", 5432) else postgres_url
    url = ensure_database(server, f"airflow_ui_{uuid.uuid4().hex[:10]}")
    yield url
    drop_database(server, url)


@pytest.fixture(scope="module")
def airflow(seeded_catalog, airflow_metadata_url, tmp_path_factory):
    catalog_url, home, _, _ = seeded_catalog
    env = {"FT_DATABASE_URL": catalog_url, "FT_HOME": str(home),
           "FT_OBJECT_STORE_URL": get_settings().data_dir.as_uri()}
    with AirflowApiServer(tmp_path_factory.mktemp("airflow_home"), airflow_metadata_url, env) as server:
        yield server


@pytest.fixture
def browser():
    with chromium() as driver:
        yield driver


def test_anonymous_requests_get_no_catalog_data(airflow, seeded_catalog):
    _, _, products, version = seeded_catalog
    product_id = int(products["id"].iloc[0])
    paths = ["", f"similar?product_id={product_id}", f"thumbnail/{product_id}", f"confusion/{version}.png"]
    for path in paths:
        for cookies in ({}, {"_token": "not-a-valid-jwt"}):
            response = requests.get(f"{airflow.base_url}{PAGE_PATH}{path}", cookies=cookies, timeout=30)
            assert response.status_code in (401, 403), (path, cookies, response.status_code)
            assert version not in response.text and products["productDisplayName"].iloc[0] not in response.text


def test_catalog_page_in_the_airflow_ui(airflow, seeded_catalog, browser):
    _, _, products, version = seeded_catalog
    wait = WebDriverWait(browser, WAIT_S)
    open_catalog_page(browser, wait, airflow)

    rows = browser.find_elements(By.CSS_SELECTOR, "#registry-table tbody tr")
    assert [row.get_attribute("data-version") for row in rows] == ["v004", "v003", "v002", "v001"]
    badges = [row.find_element(By.CSS_SELECTOR, ".badge").get_attribute("class") for row in rows]
    assert badges == ["badge promoted", "badge serving", "badge rejected", "badge retired"]
    assert "92.7%" in rows[1].text and "93.6%" in rows[0].text
    assert browser.find_element(By.ID, "serving-version").text == version == "v003"
    backfill = browser.find_element(By.ID, "backfill").text
    assert "v004" in backfill and f"{int(SEEDED_PRODUCTS * BACKFILL_SHARE)} of {SEEDED_PRODUCTS}" in backfill

    accuracy_chart = browser.find_element(By.CSS_SELECTOR, "svg[data-chart=accuracy]")
    assert len(accuracy_chart.find_elements(By.CSS_SELECTOR, "polyline.series")) == 3
    assert "baseline 91%" in accuracy_chart.text
    for chart in ("runs-tagged", "runs-errors", "runs-throughput", "categories", "confidence"):
        assert browser.find_elements(By.CSS_SELECTOR, f"svg[data-chart={chart}] rect.bar"), chart
    assert len(browser.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")) == 12
    assert browser.find_elements(By.CSS_SELECTOR, "#weak-spots tbody tr")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#low-confidence .card")) == dashboard.LOW_CONFIDENCE_LIMIT
    wait_images_loaded(browser, wait, "#confusion-image, #low-confidence img")

    product_id = int(products["id"].iloc[0])
    field = browser.find_element(By.ID, "similar-product-id")
    field.send_keys(str(product_id))
    browser.find_element(By.CSS_SELECTOR, "#similar-form button[type=submit]").click()
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".similar-neighbours .card"))
               == dashboard.SIMILAR_LIMIT)
    query_card = browser.find_element(By.CSS_SELECTOR, ".similar-query .card")
    assert query_card.get_attribute("data-product-id") == str(product_id)
    wait_images_loaded(browser, wait, "#similar-results img")

    browser.switch_to.default_content()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
