"""The registry's web page in a real browser (Debian's headless Chromium through chromedriver and Selenium), against
a real registry process with its opentracker and seeders after a real `docket push`; and real `docket agent`
heartbeats, listed by `docket hosts` and on the page, silent once the agent stopped.

Screenshots are kept as test artifacts in $DOCKET_TEST_ARTIFACTS (default: <repo>/test-artifacts/).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.agent import AgentProcess
from tests.support.image_factory import ImageFactory
from tests.support.procs import free_port, wait_until
from tests.support.registry_images import layer_tar
from tests.support.registry_server import RegistryServer
from tests.support.tools import IN_CI, need

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HEARTBEAT = 0.5  # seconds: the agent's --heartbeat-interval here
PUSH, READ = "web-push-token-0123456789", "web-read-token-0123456789"


def artifacts() -> Path:
    path = Path(os.environ.get("DOCKET_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(driver, name: str) -> Path:
    path = artifacts() / name
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    assert path.stat().st_size > 1000
    print(f"screenshot: {path}")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Chromium, the Debian binaries named explicitly (Selenium Manager downloads nothing)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        msg = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (scripts/setup.sh)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def run_cli(registry: RegistryServer, *args: str, location: Path, token: str | None = None) -> str:
    """The real `docket` command, from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if token:
        env["DOCKET_TOKEN"] = token
    cmd = [sys.executable, "-m", "docket.client.cli", "--host", registry.url, "--location", str(location), *args]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, docker_client) -> Iterator[tuple[RegistryServer, str, dict]]:
    """One registry process and one `docket push` shared by the module: (registry, ref, image record)."""
    need("ctorrent")
    need("opentracker")
    root = tmp_path_factory.mktemp("web")
    registry = RegistryServer(location=root / "registry", port=free_port(), tracker_port=free_port(),
                              log=root / "registry.log")
    factory = ImageFactory(docker_client, root / "images")
    registry.start()
    try:
        ref, _ = factory.build(data_mib=1)
        run_cli(registry, "push", ref, location=root / "client")
        record = requests.get(f"{registry.url}/api/v1/repositories/{ref.replace(':', '/tags/')}", timeout=10).json()
        yield registry, ref, record
    finally:
        registry.stop()
        factory.cleanup()


def _tag(driver, ref: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'article.tag[data-ref="{ref}"]')


def test_the_page_shows_the_pushed_tag_and_its_layers_swarm_in_a_browser(browser, pushed) -> None:
    from selenium.webdriver.common.by import By

    registry, ref, record = pushed
    layers = [layer["digest"] for layer in record["layers"]]

    def seeded() -> dict[str, int] | None:
        browser.get(f"{registry.url}/")
        rows = _tag(browser, ref).find_elements(By.CSS_SELECTOR, "tr.layer")
        counts = {}
        for row in rows:
            cells = row.find_elements(By.CSS_SELECTOR, "td.seeders")
            if not cells:
                return None  # not scraped yet (the page caches a scrape for a few seconds)
            counts[row.get_attribute("data-digest")] = int(cells[0].text)
        return counts if counts and all(counts.values()) else None

    counts = wait_until(seeded, timeout=20, interval=1, what="the page to show each layer's seeder")
    assert sorted(counts) == sorted(layers)  # every layer, each with at least the registry's own seeder
    tag = _tag(browser, ref)
    assert tag.find_element(By.CSS_SELECTOR, ".ref").text == ref
    assert record["digest"][7:19] in tag.text
    assert " MB" in tag.text and ("ago" in tag.text or "just now" in tag.text)  # human units
    assert "Health: ok" in browser.find_element(By.ID, "health").text
    assert not browser.find_elements(By.ID, "tracker-unreachable")
    assert browser.execute_script("return document.scripts.length") == 0
    screenshot(browser, "web-page-desktop.png")

    browser.set_window_size(390, 1600)  # a phone: the layer table becomes cards, no sideways scrolling
    try:
        browser.get(f"{registry.url}/")
        tag = _tag(browser, ref)
        assert not tag.find_element(By.CSS_SELECTOR, "table.layers thead").is_displayed()
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        screenshot(browser, "web-page-phone.png")
    finally:
        browser.set_window_size(1280, 1400)


def test_agent_heartbeats_list_the_host_until_it_goes_silent(browser, pushed, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    registry, _, _ = pushed
    host_id = f"e2e-{os.getpid()}"
    agent = AgentProcess(registry.url, tmp_path / "agent", free_port(), tmp_path / "agent.log",
                         extra_args=["--heartbeat-interval", str(HEARTBEAT), "--host-id", host_id],
                         env={"PYTHONPATH": str(REPO_ROOT)})  # this checkout's code, whatever is installed

    def listed() -> dict | None:
        hosts = json.loads(run_cli(registry, "hosts", "--json", location=tmp_path / "client"))
        return next((h for h in hosts if h["id"] == host_id), None)

    with agent:
        host = wait_until(listed, timeout=15, interval=0.3, what="docket hosts to list the agent")
        assert host["state"] == "ok"
        assert host["listen_address"] == agent.address
        assert host["peer_address"] and host["peer_address"].startswith("127.")
        assert host["blobs"] == {"count": 0, "bytes": 0}
        table = run_cli(registry, "hosts", location=tmp_path / "client")
        assert host_id in table and host["peer_address"] in table and "ok" in table
        browser.get(f"{registry.url}/")
        row = browser.find_element(By.CSS_SELECTOR, f'tr.host[data-host="{host_id}"]')
        assert host["peer_address"] in row.text and row.find_element(By.CSS_SELECTOR, ".state").text == "ok"
    stopped = time.monotonic()

    host = wait_until(lambda: (h := listed()) and h["state"] == "silent" and h, timeout=10, interval=0.3,
                      what="the stopped agent to show as silent")
    assert time.monotonic() - stopped >= 2 * HEARTBEAT  # not before it missed its heartbeats
    browser.get(f"{registry.url}/")
    row = browser.find_element(By.CSS_SELECTOR, f'tr.host[data-host="{host_id}"]')
    assert row.find_element(By.CSS_SELECTOR, ".state").text == "silent"
    screenshot(browser, "web-page-hosts.png")


def _push_small(url: str, ref: str) -> None:
    """A one-layer image through /api/v1 (what `docket push` sends), with the push token."""
    auth = {"Authorization": f"Bearer {PUSH}", "Content-Type": "application/octet-stream"}
    layer = layer_tar(b"only for token holders")

    def sha(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    for data, kind in ((layer, "layer"), (config, "config")):
        assert requests.post(f"{url}/api/v1/blobs?kind={kind}&digest={sha(data)}", data=data, headers=auth,
                             timeout=30).status_code in (200, 201)
    repo, _, tag = ref.rpartition(":")
    resp = requests.put(f"{url}/api/v1/repositories/{repo}/manifests/{tag}", timeout=30,
                        json={"config": sha(config), "layers": [sha(layer)]}, headers={"Authorization": f"Bearer {PUSH}"})
    assert resp.status_code == 201, resp.text


def test_with_read_tokens_the_page_shows_nothing_without_one(browser, tmp_path: Path) -> None:
    need("ctorrent")
    need("opentracker")
    registry = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                              log=tmp_path / "registry.log",
                              extra_args=["--auth-token", PUSH, "--read-token", READ])
    registry.start()
    try:
        ref = "private/secret-app:v7"
        _push_small(registry.url, ref)
        browser.get(f"{registry.url}/")  # headless: the Basic prompt cannot be answered
        assert "private" not in browser.page_source and "secret-app" not in browser.page_source
        plain = requests.get(f"{registry.url}/", timeout=10)
        assert plain.status_code == 401 and plain.headers["WWW-Authenticate"].startswith('Basic realm="docket"')

        # Basic credentials in the URL, as a user answering the prompt sends them
        browser.get(f"http://anyone:{READ}@127.0.0.1:{registry.port}/")
        assert _tag(browser, ref).is_displayed()
        screenshot(browser, "web-page-read-token.png")

        # a bearer header set through the DevTools protocol, as a proxy in front of the page would send it
        browser.delete_all_cookies()
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {READ}"}})
        try:
            browser.get(f"{registry.url}/repositories/private/secret-app")
            assert _tag(browser, ref).is_displayed()
        finally:
            browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
        basic = base64.b64encode(f"x:{READ}".encode()).decode()
        assert requests.get(f"{registry.url}/", headers={"Authorization": f"Basic {basic}"}, timeout=10).ok
    finally:
        registry.stop()
        shutil.rmtree(tmp_path / "registry", ignore_errors=True)
