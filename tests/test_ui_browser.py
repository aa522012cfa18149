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

import pandas as pd
import pytest
import requests
import sqlalchemy as sa
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fashion_tagging import dashboard, pipeline, review
from fashion_tagging.db.engine import engine_for_url, ensure_database
from fashion_tagging.settings import HEADS, PRIMARY_HEAD, get_settings
from tests.airflow_api_server import (CHROMEDRIVER, CHROMIUM, DEFAULT_USERS, AirflowApiServer, api_token, chromium,
                                      open_catalog_page, wait_images_loaded)
from tests.fixtures_services import drop_database, new_database
from tests.synthetic_catalog import catalog_products, seed_synthetic_catalog

SYSTEM_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
SCREENSHOT = Path(__file__).resolve().parent / "artifacts" / "catalog_tagging_page.png"
REVIEW_SCREENSHOT = SCREENSHOT.with_name("catalog_review_queue.png")
WAIT_S = 60
SEEDED_PRODUCTS = 200
BACKFILL_SHARE = 0.5
PAGE_PATH = "/catalog-tagging/"
CORRECTED_LABEL = "Reviewed Jackets"
VIEWER, REVIEWER = next(iter(DEFAULT_USERS)), "reviewer"  # simple auth manager roles: viewer (read-only), user
USERS = {**DEFAULT_USERS, REVIEWER: ("user", "reviewer-password")}

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
    with AirflowApiServer(tmp_path_factory.mktemp("airflow_home"), airflow_metadata_url, env, users=USERS) as server:
        yield server


@pytest.fixture
def browser():
    with chromium() as driver:
        yield driver


def test_anonymous_requests_get_no_catalog_data(airflow, seeded_catalog):
    _, _, products, version = seeded_catalog
    product_id = int(products["id"].iloc[0])
    paths = ["", f"similar?product_id={product_id}", f"thumbnail/{product_id}", f"confusion/{version}.png",
             "review/queue", "review/audit"]
    for path in paths:
        for cookies in ({}, {"_token": "not-a-valid-jwt"}):
            response = requests.get(f"{airflow.base_url}{PAGE_PATH}{path}", cookies=cookies, timeout=30)
            assert response.status_code in (401, 403), (path, cookies, response.status_code)
            assert version not in response.text and products["productDisplayName"].iloc[0] not in response.text
    for cookies in ({}, {"_token": "not-a-valid-jwt"}):
        response = requests.post(f"{airflow.base_url}{PAGE_PATH}review", cookies=cookies, timeout=30,
                                 json={"product_id": product_id, "labels": {"articleType": "Anonymous"}})
        assert response.status_code in (401, 403), (cookies, response.status_code)


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
    gate_rows = browser.find_elements(By.CSS_SELECTOR, "#gate-table tbody tr")
    assert [row.get_attribute("data-version") for row in gate_rows] == ["v004", "v003", "v002"]
    assert "rejected" in gate_rows[2].text and "0.118" in gate_rows[2].text and "v001" in gate_rows[2].text
    drift_rows = browser.find_elements(By.CSS_SELECTOR, "#drift-table tbody tr")
    assert len(drift_rows) == 2 and "drift alert" in drift_rows[0].text and "ok" in drift_rows[1].text
    assert "drift alert" in browser.find_element(By.ID, "drift-flag").text
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


def test_a_reviewer_corrects_a_tag_a_viewer_cannot_and_the_snapshot_trains_on_it(airflow, seeded_catalog, browser,
                                                                               tmp_path):
    catalog_url, _, _, version = seeded_catalog
    engine = engine_for_url(catalog_url)
    wait = WebDriverWait(browser, WAIT_S)
    open_catalog_page(browser, wait, airflow, user=REVIEWER)

    # the queue: needs-review first (every seeded tag predates routing), lowest confidence first
    item = wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#review-queue .review-item form"))[0]
    product_id = int(item.get_attribute("data-product-id"))
    with dashboard.read_only(engine) as conn:
        expected = review.review_queue(conn, version)
    assert product_id == expected["items"][0]["product_id"]
    wait_images_loaded(browser, wait, "#review-queue img")
    predicted = expected["items"][0]["tags"][0]["predicted"]
    field = item.find_element(By.CSS_SELECTOR, f"input[data-head={PRIMARY_HEAD}]")
    assert field.get_attribute("value") == predicted
    field.clear()
    field.send_keys(CORRECTED_LABEL)
    item.find_element(By.CSS_SELECTOR, "button.review-save").click()
    wait.until(lambda driver: f"{PRIMARY_HEAD} corrected" in item.find_element(By.CLASS_NAME, "review-result").text)
    audit_row = wait.until(lambda driver: driver.find_elements(
        By.CSS_SELECTOR, f"#review-audit-table tr[data-product-id='{product_id}'][data-head={PRIMARY_HEAD}]"))[0]
    assert audit_row.find_element(By.CLASS_NAME, "reviewer").text == REVIEWER
    assert audit_row.find_element(By.CLASS_NAME, "after").text == CORRECTED_LABEL
    REVIEW_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.find_element(By.ID, "review").screenshot(str(REVIEW_SCREENSHOT))

    with engine.connect() as conn:
        audit = conn.execute(sa.text("SELECT head, action, before_label, after_label, reviewer, model_version "
                                     "FROM review_audit WHERE product_id = :id ORDER BY audit_id"),
                             {"id": product_id}).all()
    # the other heads were kept as the model had them: accepted, each audited once
    assert (PRIMARY_HEAD, "corrected", predicted, CORRECTED_LABEL, REVIEWER, version) in audit
    assert {row.reviewer for row in audit} == {REVIEWER} and {row.head for row in audit} == set(HEADS)

    # CSRF: the login cookie alone does not write; the page's token from a foreign origin does not either
    review_url = f"{airflow.base_url}{PAGE_PATH}review"
    cookies = {"_token": browser.get_cookie("_token")["value"]}
    token = browser.execute_script("return document.getElementById('review').dataset.csrf")
    body = {"product_id": product_id, "labels": {PRIMARY_HEAD: "Forged"}}
    refused = [requests.post(review_url, json=body, cookies=cookies, headers=headers, timeout=30) for headers in (
        {}, {"X-CSRF-Token": "1.forged"}, {"X-CSRF-Token": token, "Origin": "http://attacker.example"},
        {"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"})]
    assert [r.status_code for r in refused] == [403] * 4 and all("CSRF" in r.json()["detail"] for r in refused)
    in_page = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('review', {method: 'POST', credentials: 'same-origin', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify(arguments[0])}).then(r => done(r.status));", body)
    assert in_page == 403  # the page's own origin, but without the token
    retried = requests.post(review_url, json={**body, "labels": {PRIMARY_HEAD: CORRECTED_LABEL}}, cookies=cookies,
                            headers={"X-CSRF-Token": token}, timeout=30)
    assert retried.status_code == 200 and retried.json()["changed"] == []  # idempotent: nothing new

    # a viewer sees the queue without edit controls and is refused on the write endpoint
    with chromium() as viewer:
        viewer_wait = WebDriverWait(viewer, WAIT_S)
        open_catalog_page(viewer, viewer_wait, airflow, user=VIEWER)
        viewer_wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#review-queue .review-item"))
        assert viewer.find_element(By.ID, "review-read-only").is_displayed()
        controls = "#review-queue form, #review-queue input, #review-queue .review-save"
        assert viewer.find_elements(By.CSS_SELECTOR, controls) == []
        assert viewer.execute_script("return document.getElementById('review').dataset.csrf") is None
        viewer_cookie = {"_token": viewer.get_cookie("_token")["value"]}
    bearer = {"Authorization": f"Bearer {api_token(airflow, VIEWER)}"}
    for attempt in ({"cookies": viewer_cookie, "headers": {"X-CSRF-Token": token}}, {"headers": bearer}):
        response = requests.post(review_url, json=body, timeout=30, **attempt)
        assert (response.status_code, response.json()["detail"]) == (403, "Forbidden")
    reviewer_bearer = {"Authorization": f"Bearer {api_token(airflow, REVIEWER)}"}
    assert requests.post(review_url, json={**body, "labels": {PRIMARY_HEAD: CORRECTED_LABEL}}, timeout=30,
                         headers=reviewer_bearer).status_code == 200  # an API client: a bearer token, no cookie
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM review_audit")).scalar_one() == len(audit)
        assert conn.execute(sa.text("SELECT label FROM product_reviews WHERE product_id = :id AND head = :h"),
                            {"id": product_id, "h": PRIMARY_HEAD}).scalar_one() == CORRECTED_LABEL

    # the next retrain's snapshot trains on the correction and says so
    settings = get_settings(home=tmp_path / "home", database_url=catalog_url,
                            object_store_url=(tmp_path / "store").as_uri())
    snapshot = pipeline.snapshot_training_data(settings)
    assert snapshot[review.REVIEW_LABELS_KEY]["corrections"] == 1
    assert snapshot[review.REVIEW_LABELS_KEY]["labels"] == len(audit)
    frame = pd.read_parquet(tmp_path / "store" / snapshot["snapshot_key"]).set_index("id")
    assert frame.loc[product_id, PRIMARY_HEAD] == CORRECTED_LABEL


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
