"""The viewer in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

Skipped with a reason where the browser is absent (CI installs ``chromium chromium-driver``).
Screenshots land in the test's temp folder; with ``WDS_VIEW_SCREENSHOT_DIR=DIR`` they are also
copied there (that is how ``docs/img/viewer.png`` is made: the tiny VQGAN's pictures).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from view_fixtures import HOSTILE, build_tokenizer, load_gray_renderer, make_view_dataset  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(
            f"no headless browser: {', '.join(missing)} missing "
            "(apt-get install chromium chromium-driver; CI installs them)"
        )
    pytest.importorskip("selenium", reason="selenium is not installed (the dev extra has it)")
    from selenium import webdriver

    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium: no usage pings
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,860",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    from wds_tools.view.data import open_source
    from wds_tools.view.server import App, Viewer

    root = tmp_path_factory.mktemp("view")
    tok = build_tokenizer(str(root / "tok"))
    manifest = make_view_dataset(str(root), tok)
    app = App(open_source(manifest), tokenizer=tok, renderer=load_gray_renderer("16"))
    with Viewer(app) as v:
        v.manifest = manifest
        yield v


def _save(driver, tmp_path, name: str) -> str:
    path = str(tmp_path / name)
    driver.save_screenshot(path)
    assert os.path.getsize(path) > 10_000
    out = os.environ.get("WDS_VIEW_SCREENSHOT_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, os.path.join(out, name))
    return path


def _cards(driver) -> dict:
    from selenium.webdriver.common.by import By

    return {
        c.find_element(By.CLASS_NAME, "k").text: c.find_element(By.CLASS_NAME, "v").text
        for c in driver.find_elements(By.CLASS_NAME, "card")
    }


def _not_pwned(driver) -> None:
    assert driver.title != "pwned"
    assert driver.execute_script("return typeof window.__pwned") == "undefined"


def test_overview_counts_then_sample_by_key(browser, viewer, tmp_path):
    from selenium.webdriver.common.by import By

    with open(viewer.manifest) as f:
        m = json.load(f)
    browser.get(viewer.url)
    cards = _cards(browser)
    assert cards["shards"] == "3" and cards["samples"] == "12"
    assert cards["tokens"] == f"{m['num_tokens']:,}"
    assert cards["supervised tokens"] == f"{m['num_supervised'] / m['num_tokens']:.1%}"
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 4
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.chart rect")
    assert len(bars) >= 6  # histograms are drawn, not tabulated
    assert "from all 3 shards (12 samples)" in browser.find_element(By.TAG_NAME, "main").text
    _save(browser, tmp_path, "viewer-overview.png")

    # by key: search the key on the sample list, follow the hit
    browser.find_element(By.LINK_TEXT, "samples").click()
    box = browser.find_element(By.NAME, "q")
    box.send_keys("pics-0002")
    box.submit()
    browser.find_element(By.LINK_TEXT, "pics-0002").click()
    assert browser.current_url.endswith("/d/0/s/2")
    conv = browser.find_element(By.CLASS_NAME, "conv")
    assert "A red square number 2." in conv.text
    assert "User: What is in the picture 2?" in conv.text
    trained = " ".join(t.text for t in browser.find_elements(By.CSS_SELECTOR, ".t.train"))
    masked = " ".join(t.text for t in browser.find_elements(By.CSS_SELECTOR, ".t.ctx"))
    assert "A red square number 2." in trained and "What is in the picture" in masked
    specials = [s.text for s in browser.find_elements(By.CLASS_NAME, "sp")]
    assert "<s>" in specials and "</s>" in specials
    img = browser.find_element(By.CSS_SELECTOR, "figure.img img")
    deadline = time.monotonic() + 10
    while not img.get_property("complete") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (img.get_property("naturalWidth"), img.get_property("naturalHeight")) == (96, 96)
    assert "grid 6x6" in browser.find_element(By.CSS_SELECTOR, "figure.img figcaption").text
    _save(browser, tmp_path, "viewer-gray-renderer.png")

    browser.find_element(By.PARTIAL_LINK_TEXT, "next").click()
    assert browser.current_url.endswith("/d/0/s/3")


def test_script_in_data_does_not_run(browser, viewer, tmp_path):
    from selenium.webdriver.common.by import By

    for path in (
        "d/0/s/7",
        "d/0/samples",
        "d/0/samples?q=%3Cscript%3E&field=id",
        "d/0/samples?q=pwned&field=meta",
    ):
        browser.get(viewer.url + path)
        _not_pwned(browser)
        # shown as text (the sample list shortens long values)
        assert HOSTILE[:30] in browser.find_element(By.TAG_NAME, "main").text, path
    browser.get(viewer.url + "d/0/s/7")
    assert HOSTILE in browser.find_element(By.CLASS_NAME, "conv").text
    assert browser.find_elements(By.CSS_SELECTOR, "main script") == []


def _wait_loaded(img) -> None:
    deadline = time.monotonic() + 30
    while not img.get_property("complete") and time.monotonic() < deadline:
        time.sleep(0.05)


def test_tiny_vqgan_pictures_in_the_browser(browser, tmp_path):
    """``lumina view --vq TINY``: the bundled photos, decoded from their tokens, on the page."""
    import argparse

    from selenium.webdriver.common.by import By

    from lumina import view as lumina_view
    from wds_tools.view import build_app
    from wds_tools.view.server import Viewer

    from view_fixtures import tiny_lumina_dataset

    manifest, root = tiny_lumina_dataset()
    p = argparse.ArgumentParser()
    lumina_view.add_arguments(p)
    args = p.parse_args([manifest, "--vq", root, "--device", "cpu"])
    app = build_app(args, lumina_view.renderer_from_args(args))
    with Viewer(app) as v:
        browser.get(v.url + "d/0/key/photo-astronaut")
        assert browser.current_url.endswith("/d/0/s/0")
        conv = browser.find_element(By.CLASS_NAME, "conv").text
        assert "An astronaut in an orange suit in front of a flag." in conv
        img = browser.find_element(By.CSS_SELECTOR, "figure.img img")
        _wait_loaded(img)
        assert (img.get_property("naturalWidth"), img.get_property("naturalHeight")) == (256, 256)
        _not_pwned(browser)
        _save(browser, tmp_path, "viewer.png")
