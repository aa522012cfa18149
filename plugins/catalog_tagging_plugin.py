"""Airflow UI plugin: the "Catalog tagging" page in the Airflow navigation.

Thin on purpose: routes and templates only; the read-only queries live in
``fashion_tagging.dashboard``. The page is a FastAPI app mounted in the Airflow api-server and shown
in the UI as an external view (an iframe on the same origin, so the browser sends the Airflow
login cookie). Every route requires that login: Airflow's auth manager checks the JWT and the
user's right to see the Airflow website; an anonymous request gets 401 and no data.
"""

from __future__ import annotations

import functools
from pathlib import Path

from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
from airflow.api_fastapi.core_api.security import requires_access_view
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from fashion_tagging import dashboard
from fashion_tagging.db.engine import get_engine
from fashion_tagging.objectstore import ObjectNotFound, open_configured_store
from fashion_tagging.settings import HEADS, PRIMARY_HEAD, get_settings

URL_PREFIX = "/catalog-tagging"
PAGE_NAME = "Catalog tagging"
TEMPLATE_DIR = Path(__file__).resolve().parent / "catalog_tagging"
IMAGE_CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}
NO_IMAGE_SVG = (TEMPLATE_DIR / "no_image.svg").read_bytes()
NAV_ICON_SVG = (TEMPLATE_DIR / "icon.svg").read_bytes()

require_airflow_login = requires_access_view(AccessView.WEBSITE)
app = FastAPI(title=PAGE_NAME, dependencies=[Depends(require_airflow_login)], docs_url=None, redoc_url=None,
              openapi_url=None)


@functools.cache
def _settings():
    return get_settings()


@functools.cache
def _store():
    return open_configured_store(_settings())


def _catalog():
    """A read-only connection to the catalog database (``FT_DATABASE_URL`` or the embedded server)."""
    return dashboard.read_only(get_engine(_settings()))


@functools.cache
def _templates() -> Environment:
    environment = Environment(loader=FileSystemLoader(TEMPLATE_DIR), autoescape=select_autoescape(["html"]))
    environment.filters.update(pct=_percent, num=_number, when=_timestamp)
    return environment


def _render(template: str, status_code: int = 200, **context) -> HTMLResponse:
    html = _templates().get_template(template).render(heads=HEADS, primary_head=PRIMARY_HEAD, **context)
    return HTMLResponse(html, status_code=status_code)


def _percent(value, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _number(value, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _timestamp(value, layout: str = "%Y-%m-%d %H:%M") -> str:
    return "–" if value is None else value.strftime(layout)


@app.get("/", response_class=HTMLResponse)
def catalog_page() -> HTMLResponse:
    """The whole page, rendered server-side (charts are inline SVG)."""
    with _catalog() as conn:
        data = dashboard.overview(conn)
    return _render("page.html", baseline=_settings().baseline_accuracy, **data)


@app.get("/similar", response_class=HTMLResponse)
def similar_products(product_id: int = Query(..., ge=0)) -> HTMLResponse:
    """HTML fragment with a product and its nearest neighbours (the page's lookup form fetches it)."""
    with _catalog() as conn:
        result = dashboard.similar_products(conn, product_id, dashboard.displayed_version(conn))
    return _render("similar.html", status_code=200 if result else 404, product_id=product_id, result=result)


@app.get("/thumbnail/{product_id}")
def thumbnail(product_id: int) -> Response:
    """A product photo from the object store, or a placeholder when it has none."""
    with _catalog() as conn:
        key = dashboard.image_key(conn, product_id)
    try:
        if key:
            return Response(_store().get(key), media_type="image/jpeg", headers=IMAGE_CACHE_HEADERS)
    except ObjectNotFound:
        pass
    return Response(NO_IMAGE_SVG, media_type="image/svg+xml", headers=IMAGE_CACHE_HEADERS)


@app.get("/confusion/{version}.png")
def confusion_matrix(version: str) -> Response:
    """The confusion-matrix picture of a registered model version, from its artifact."""
    with _catalog() as conn:
        uri = dashboard.artifact_uri(conn, version)
    picture = dashboard.read_artifact_file(_settings(), version, uri, dashboard.CONFUSION_PNG) if uri else None
    if picture is None:
        return Response(status_code=404)
    return Response(picture, media_type="image/png", headers=IMAGE_CACHE_HEADERS)


@app.get("/icon.svg")
def nav_icon() -> Response:
    """The page's icon in the Airflow navigation."""
    return Response(NAV_ICON_SVG, media_type="image/svg+xml", headers=IMAGE_CACHE_HEADERS)


class CatalogTaggingPlugin(AirflowPlugin):
    """Registers the app under ``/catalog-tagging`` and its entry in the Airflow UI navigation."""

    name = "catalog_tagging"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": PAGE_NAME}]
    external_views = [{
        "name": PAGE_NAME,
        "href": URL_PREFIX.lstrip("/") + "/",  # relative: works under any Airflow base URL
        "icon": URL_PREFIX.lstrip("/") + "/icon.svg",
        "url_route": "catalog-tagging",
        "destination": "nav",
    }]
