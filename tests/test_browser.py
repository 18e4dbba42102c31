"""The web page in a real browser: headless Chromium driven by Selenium, against
``visearch-serve --http-port 0`` started as its own process on a small index.

It uploads a user photo through the page's file input and checks that the expected SKU
appears among the results shown, with the same SKUs in the same order as the gRPC service
answers, and that a bad upload shows the server's own message. Skipped, saying so, only when
no Chromium or chromedriver is installed (``make test`` installs them where it can).
Selenium is given the driver's path: its driver manager would go to the network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_web import build_web_index

from benchmarks.latency import spawn_server
from server.client import SearchClient


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


CHROMIUM = _find("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMEDRIVER = _find("/usr/bin/chromedriver", "chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium/chromedriver not installed (Debian: apt-get install chromium "
           "chromium-driver; `make test` tries): the web page's browser test cannot run",
)


@pytest.fixture(scope="module")
def served(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    """``visearch-serve`` in its own process: (gRPC address, page URL, index root)."""
    root, _, _ = build_web_index(tiny_world, tmp_path_factory.mktemp("browser_index"))
    proc, address = spawn_server(root, "--http-port", "0", "--no-detector")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "web page at " in line, f"no web page: {line!r}"
        yield address, line.split("web page at ", 1)[1].strip(), root
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # graceful shutdown, HTTP side included


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium reach the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _query(world: Path, address: str) -> tuple[Path, str, list[str]]:
    """The first user photo of the world whose true SKU the service ranks in its top 10
    (whole photo, as the page sends it; the embedder is untrained, so not every one), that
    SKU, and the SKUs the service answers for the photo."""
    rows = [json.loads(line) for line in (world / "queries.jsonl").read_text().splitlines()]
    with SearchClient(address, timeout=30) as client:
        client.wait_ready()
        for row in rows:
            photo = world / row["image"]
            skus = [r.sku for r in client.search(photo.read_bytes(), top_k=10).results]
            if row["sku"] in skus:
                return photo, row["sku"], skus
    raise AssertionError("no user photo of the world has its SKU in the top 10")


def test_upload_shows_the_expected_sku(browser, served, tiny_world: Path, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    address, url, root = served
    photo, sku, expected = _query(tiny_world, address)
    browser.get(url)
    wait = WebDriverWait(browser, 30)
    current = (root / "CURRENT").read_text().strip()
    wait.until(ec.text_to_be_present_in_element((By.ID, "index-version"), current))
    assert browser.find_element(By.ID, "health-status").text == "SERVING"

    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
               in ("done", "error"))
    assert browser.find_element(By.ID, "error").is_displayed() is False
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    shown = [c.get_attribute("data-sku") for c in cards]
    assert sku in shown and shown == expected[:len(shown)] and len(shown) == 10
    card = cards[shown.index(sku)]
    assert sku in card.text
    # The thumbnails loaded (served from the version's store of images).
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every("
        "i => i.complete && i.naturalWidth > 0)"))
    votes = browser.find_elements(By.CSS_SELECTOR, "#votes tbody tr")
    assert votes and browser.find_element(By.CSS_SELECTOR, "#votes tr.chosen")

    bad = tmp_path / "not_a_photo.jpg"
    bad.write_bytes(b"this is not an image")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
               == "error")
    message = browser.find_element(By.ID, "error").text
    with SearchClient(address, timeout=30) as client, pytest.raises(grpc.RpcError) as err:
        client.search(bad.read_bytes())
    assert message == f"{err.value.details()} (INVALID_ARGUMENT)"
    assert browser.find_elements(By.CSS_SELECTOR, "#results .result") == []


def _state(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") or ""


def test_box_drawn_with_the_mouse_and_a_dropped_file(browser, served, tiny_world: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    address, url, _ = served
    row = json.loads((tiny_world / "queries.jsonl").read_text().splitlines()[0])
    photo = tiny_world / row["image"]
    browser.get(url)
    wait = WebDriverWait(browser, 30)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: _state(d) == "done")
    assert browser.execute_script("return state.answer.mainObject.source") == "image"

    # Drag the query's true box on the canvas: photo pixels -> CSS pixels from its centre.
    canvas = browser.find_element(By.ID, "photo")
    scale = (browser.execute_script("return state.scale") * canvas.size["width"]
             / float(canvas.get_attribute("width")))
    x1, y1, x2, y2 = (v * scale for v in row["bbox"])
    cx, cy = canvas.size["width"] / 2, canvas.size["height"] / 2
    browser.execute_script("document.body.dataset.state = 'drawing'")
    (ActionChains(browser).move_to_element_with_offset(canvas, int(x1 - cx), int(y1 - cy))
     .click_and_hold().move_by_offset(int(x2 - x1), int(y2 - y1)).release().perform())
    wait.until(lambda d: _state(d) == "done")
    answer = browser.execute_script("return state.answer")
    box = answer["mainObject"]["box"]
    assert answer["mainObject"]["source"] == "request"
    got = [box[k] for k in ("x1", "y1", "x2", "y2")]
    assert np.allclose(got, row["bbox"], atol=2.5 / scale)  # whole CSS pixels, (got, row["bbox"])
    assert "your box" in browser.find_element(By.ID, "main-object").text
    with SearchClient(address, timeout=30) as client:
        expected = [r.sku for r in client.search(photo.read_bytes(), top_k=10, bbox=got).results]
    shown = [c.get_attribute("data-sku")
             for c in browser.find_elements(By.CSS_SELECTOR, "#results .result")]
    assert shown == expected

    # A file dropped on the drop zone (a DragEvent carrying it, as a desktop drag does).
    browser.execute_script("""
        const dt = new DataTransfer();
        dt.items.add(new File(["\\x00\\x01 not a photo"], "x.png", {type: "image/png"}));
        document.body.dataset.state = "dropping";
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    """)
    wait.until(lambda d: _state(d) == "error")
    assert browser.find_element(By.ID, "error").text.endswith("(INVALID_ARGUMENT)")
    assert browser.find_element(By.ID, "clear-box").get_attribute("disabled") is not None


def test_issue19_panels_render_when_the_response_has_them(browser, served) -> None:
    """``categoryTop`` and ``attributes`` (issue 19) are not in this proto yet: render an
    answer that has them, as MessageToDict will write it."""
    from selenium.webdriver.common.by import By

    browser.get(served[1])
    browser.execute_script("""render({category: {category: "shoe", votes: []},
        categoryTop: [{category: "shoe", probability: 0.875}, {category: "bag", score: 0.1}],
        attributes: [{name: "color", value: "red", score: 0.75}],
        results: [{sku: "S1", score: 0.5, category: "shoe", itemId: "0", thumbnail: "/x",
                   attributes: {color: "red"}}]})""")
    top = browser.find_element(By.ID, "category-top")
    assert top.is_displayed() and top.text.splitlines()[1:] == ["shoe 0.875", "bag 0.100"]
    attrs = browser.find_element(By.ID, "attributes")
    assert attrs.is_displayed() and "color" in attrs.text and "value: red" in attrs.text
    card = browser.find_element(By.CSS_SELECTOR, "#results .result[data-sku='S1']")
    assert "red" in card.text
    browser.execute_script("render({category: {votes: []}, results: []})")
    assert not browser.find_element(By.ID, "category-top").is_displayed()
    assert not browser.find_element(By.ID, "attributes").is_displayed()
