"""Screenshot the Catalog tagging page on the data of a finished ``make demo`` (the README's picture).

    .venv/bin/python scripts/screenshot_catalog_page.py [--home .fashion-tagging] [--out docs/img/catalog_tagging_page.png]

Starts a real Airflow api-server with the plugin on the demo's state directory (its embedded
PostgreSQL holds the catalog; a database beside it holds Airflow's metadata), logs in with headless
Chromium, looks up the products similar to one the nightly run tagged, and saves the whole page.
It reuses the UI test's harness (``tests/airflow_api_server.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from fashion_tagging.dashboard import SIMILAR_LIMIT, displayed_version, read_only  # noqa: E402
from fashion_tagging.db.engine import embedded_postgres_url, ensure_database, get_engine  # noqa: E402
from fashion_tagging.settings import get_settings  # noqa: E402
from tests.airflow_api_server import AirflowApiServer, chromium, open_catalog_page, wait_images_loaded  # noqa: E402,I001

WAIT_S = 120


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(REPO / ".fashion-tagging"), help="the demo's FT_HOME")
    parser.add_argument("--out", default=str(REPO / "docs/img/catalog_tagging_page.png"))
    parser.add_argument("--height", type=int, default=3000, help="window height in pixels (the whole page)")
    args = parser.parse_args()

    settings = get_settings(home=Path(args.home).resolve())
    with read_only(get_engine(settings)) as conn:
        version = displayed_version(conn)
        if version is None:
            raise SystemExit(f"no serving model under {settings.home}: run `make demo` first")
        product_id = conn.execute(
            sa.text("SELECT product_id FROM embeddings WHERE model_version = :v "
                                          "ORDER BY product_id DESC LIMIT 1"), {"v": version}).scalar_one()
    metadata_url = ensure_database(embedded_postgres_url(settings.pgdata_dir), "airflow_screenshot")
    env = {"FT_HOME": str(settings.home)}
    env.update({k: v for k, v in os.environ.items() if k.startswith("FT_") and k != "FT_HOME"})
    with AirflowApiServer(settings.home / "airflow-screenshot", metadata_url, env) as server, \
            chromium(height=args.height) as browser:
        wait = WebDriverWait(browser, WAIT_S)
        open_catalog_page(browser, wait, server)
        browser.find_element(By.ID, "similar-product-id").send_keys(str(product_id))
        browser.find_element(By.CSS_SELECTOR, "#similar-form button[type=submit]").click()
        wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".similar-neighbours .card"))
                   == SIMILAR_LIMIT)
        wait_images_loaded(browser, wait, "img")
        browser.switch_to.default_content()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(args.out)
    print(f"saved {args.out} (serving model {version}, similar products of {product_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
