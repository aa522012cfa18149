"""A real Airflow api-server in a throw-away AIRFLOW_HOME, and a headless Chromium to drive it.

For the UI test, the page benchmark and the README's screenshot: simple auth manager with known
users, the repository's ``plugins/`` folder, an empty dags folder and a PostgreSQL metadata
database given by the caller (never SQLite). Chromium is Debian's (``chromium``, ``chromium-driver``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
START_TIMEOUT_S = 180
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
DEFAULT_USERS = {"tester": ("viewer", "tester-password")}


class AirflowApiServer:
    """``with AirflowApiServer(home, metadata_url, env) as server: server.base_url``; stops it on exit."""

    def __init__(self, home: Path, metadata_url: str, extra_env: dict[str, str] | None = None,
                 users: dict[str, tuple[str, str]] | None = None):
        self.home = Path(home)
        self.users = users or DEFAULT_USERS
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **self._airflow_env(metadata_url), **(extra_env or {})}
        self.process: subprocess.Popen | None = None

    def _airflow_env(self, metadata_url: str) -> dict[str, str]:
        return {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.home / "dags"),
            "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False",
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{role}" for u, (role, _) in self.users.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
        }

    def __enter__(self) -> AirflowApiServer:
        (self.home / "dags").mkdir(parents=True, exist_ok=True)
        (self.home / "passwords.json").write_text(json.dumps({u: pw for u, (_, pw) in self.users.items()}))
        subprocess.run([AIRFLOW, "db", "migrate"], env=self.env, check=True, capture_output=True, timeout=300)
        log = (self.home / "api-server.log").open("wb")
        self.process = subprocess.Popen(
            [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).ok:
                    return
            time.sleep(1)
        raise RuntimeError(f"Airflow api-server did not start:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        path = self.home / "api-server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def __exit__(self, *exc_info) -> None:
        """Stop the server's whole process group (uvicorn and its worker)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def api_token(server: AirflowApiServer, user: str | None = None) -> str:
    """A JWT for ``user`` (the first configured one by default) from the auth manager's token endpoint."""
    user = user or next(iter(server.users))
    response = requests.post(f"{server.base_url}/auth/token", json={"username": user, "password": server.users[user][1]},
                             timeout=30)
    response.raise_for_status()
    return response.json()["access_token"]


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def chromium(width: int = 1440, height: int = 3800):
    """A headless Chromium WebDriver with a throw-away profile (the window holds the whole page)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def log_in(browser, wait, server: AirflowApiServer, user: str | None = None) -> None:
    """Through the simple auth manager's login form, as a person would (the first configured user by default)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    user = user or next(iter(server.users))
    password = server.users[user][1]
    browser.get(server.base_url + "/")
    wait.until(expected_conditions.presence_of_element_located((By.NAME, "username"))).send_keys(user)
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda driver: driver.get_cookie("_token") is not None)


def open_catalog_page(browser, wait, server: AirflowApiServer, user: str | None = None) -> None:
    """Log in, follow the navigation's "Catalog tagging" entry and enter the page's iframe once it has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    log_in(browser, wait, server, user)
    wait.until(expected_conditions.element_to_be_clickable(
        (By.XPATH, "//a[contains(@href, 'plugin/catalog-tagging')]"))).click()
    wait.until(expected_conditions.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
    wait.until(expected_conditions.presence_of_element_located((By.ID, "registry-table")))


def wait_images_loaded(browser, wait, selector: str) -> None:
    """Every matching <img> decoded (thumbnails and the confusion PNG came through the plugin)."""
    script = ("return Array.from(document.querySelectorAll(arguments[0]))"
              ".every(img => img.complete && img.naturalWidth > 0);")
    browser.execute_script("document.querySelectorAll(arguments[0]).forEach(img => img.loading = 'eager');", selector)
    wait.until(lambda driver: driver.execute_script(script, selector))
