"""Airflow UI plugin: the "Catalog tagging" page in the Airflow navigation.

Thin on purpose: routes and templates only; the read-only queries live in
``fashion_tagging.dashboard``, the review loop in ``fashion_tagging.review``. The page is a FastAPI
app mounted in the Airflow api-server and shown in the UI as an external view (an iframe on the
same origin, so the browser sends the Airflow login cookie). Every route requires that login:
Airflow's auth manager checks the JWT and the user's right to see the Airflow website; an
anonymous request gets 401 and no data.

The one write, ``POST review``, also needs edit rights on the ``retrain_tagger`` DAG (the auth
manager's ``is_authorized_dag`` with PUT, via Airflow's ``requires_access_dag``: the DAG the
corrections train) and, when the login cookie authenticates it, a same-origin request carrying
the page's CSRF token in ``X-CSRF-Token`` (an HMAC of the user and the time, keyed by Airflow's
``[api] secret_key``). A user without edit rights gets a page without edit controls and 403 on
the write.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag, requires_access_view
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field

from fashion_tagging import dashboard, review
from fashion_tagging.db.engine import get_engine
from fashion_tagging.db.repository import NotFound
from fashion_tagging.objectstore import ObjectNotFound, open_configured_store
from fashion_tagging.settings import HEADS, PRIMARY_HEAD, get_settings

URL_PREFIX = "/catalog-tagging"
PAGE_NAME = "Catalog tagging"
TEMPLATE_DIR = Path(__file__).resolve().parent / "catalog_tagging"
IMAGE_CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}
NO_IMAGE_SVG = (TEMPLATE_DIR / "no_image.svg").read_bytes()
NAV_ICON_SVG = (TEMPLATE_DIR / "icon.svg").read_bytes()

require_airflow_login = requires_access_view(AccessView.WEBSITE)
REVIEW_DAG_ID = "retrain_tagger"  # edit rights on it = the right to review (corrections train it)
require_review_rights = requires_access_dag(method="PUT", param_dag_id=REVIEW_DAG_ID)
CSRF_HEADER = "X-CSRF-Token"
CSRF_MAX_AGE_S = 12 * 3600
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
def catalog_page(request: Request, user: GetUserDep) -> HTMLResponse:
    """The whole page, rendered server-side (charts are inline SVG; the review queue loads as a fragment)."""
    with _catalog() as conn:
        data = dashboard.overview(conn)
        categories = review.queue_categories(conn, data["version"])
    editor = _can_review(request, user)
    reviewing = {"can_edit": editor, "csrf_token": _csrf_token(user) if editor else None,
                 "categories": categories, "dag_id": REVIEW_DAG_ID}
    return _render("page.html", baseline=_settings().baseline_accuracy, review=reviewing, **data)


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


# --- the review loop -------------------------------------------------------------------------------


class ReviewBody(BaseModel):
    """A reviewer's values of a product's heads: unchanged = accepted, changed = corrected."""

    product_id: int = Field(ge=0)
    labels: dict[str, str]
    model_version: str | None = None  # whose tags the reviewer saw (default: the displayed model)


@app.get("/review/queue", response_class=HTMLResponse)
def review_queue(request: Request, user: GetUserDep, head: str = PRIMARY_HEAD,
                 category: str | None = None) -> HTMLResponse:
    """HTML fragment: the review queue for one head (and articleType category), with forms for reviewers."""
    with _catalog() as conn:
        version = dashboard.displayed_version(conn)
        try:
            queue = review.review_queue(conn, version, head=head, category=category)
        except review.ReviewError as error:
            raise HTTPException(400, str(error)) from error
        uri = dashboard.artifact_uri(conn, version) if version else None
    choices = review.label_choices(_model_labels(version, uri), queue["items"])
    return _render("review_queue.html", queue=queue, version=version, can_edit=_can_review(request, user),
                   choices=choices)


@app.get("/review/audit", response_class=HTMLResponse)
def review_audit(product_id: int | None = Query(None, ge=0)) -> HTMLResponse:
    """HTML fragment: the newest review audit rows (who, when, before, after)."""
    with _catalog() as conn:
        rows = review.recent_reviews(conn, product_id=product_id)
    return _render("review_audit.html", audit=rows)


@app.post("/review", dependencies=[Depends(require_review_rights)])
def submit_review(body: ReviewBody, request: Request, user: GetUserDep) -> JSONResponse:
    """Accept or correct a product's tags; 403 without edit rights or (cookie login) without the CSRF token."""
    bearer = request.headers.get("authorization", "").lower().startswith("bearer ")  # then get_user ignores the cookie
    if not bearer:  # the browser's ambient login cookie authenticates it: prove the page sent it
        if not _same_origin(request) or not _valid_csrf_token(request.headers.get(CSRF_HEADER), user):
            raise HTTPException(403, "CSRF check failed: send the page's token in X-CSRF-Token from the page")
    try:
        with get_engine(_settings()).begin() as conn:
            version = body.model_version or dashboard.displayed_version(conn)
            result = review.submit_review(conn, body.product_id, body.labels, user.get_name(), version=version)
    except NotFound as error:
        raise HTTPException(404, str(error)) from error
    except review.ReviewError as error:
        raise HTTPException(400, str(error)) from error
    return JSONResponse(result)


def _can_review(request: Request, user) -> bool:
    """The same check as the write's dependency: may this user review?"""
    try:
        require_review_rights(request, user)
    except HTTPException:
        return False
    return True


@functools.cache
def _csrf_secret() -> bytes:
    from airflow.configuration import conf

    secret = conf.get("api", "secret_key", fallback="") or ""
    return secret.encode() if secret else secrets.token_bytes(32)  # no key: tokens hold within this process


def _csrf_token(user, issued: int | None = None) -> str:
    issued = int(time.time()) if issued is None else issued
    digest = hmac.new(_csrf_secret(), f"catalog-review|{user.get_id()}|{issued}".encode(), hashlib.sha256).hexdigest()
    return f"{issued}.{digest}"


def _valid_csrf_token(token: str | None, user) -> bool:
    issued, _, _ = (token or "").partition(".")
    if not issued.isdigit() or not 0 <= time.time() - int(issued) <= CSRF_MAX_AGE_S:
        return False
    return hmac.compare_digest(token.encode(), _csrf_token(user, int(issued)).encode())


def _same_origin(request: Request) -> bool:
    """The browser says the request comes from this origin (Sec-Fetch-Site, Origin), or says nothing."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


@functools.lru_cache(maxsize=8)
def _model_labels(version: str | None, uri: str | None) -> dict:
    """The classes per head of a registered model (its labels.json), for the correction inputs' suggestions."""
    if version is None:
        return {}
    return review.parse_labels_json(dashboard.read_artifact_file(_settings(), version, uri, "labels.json"))


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
