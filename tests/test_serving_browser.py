"""Integration: a person's path through the upload page, in headless Chromium.

Chromium comes from Debian's ``chromium`` package (no browser download); it is driven
with the ``playwright`` PyPI package through ``executable_path``. Skips if either is
missing. The server is the real gunicorn.
"""

from __future__ import annotations

import shutil

import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, make_leaf_image
    from tests.serving_support import GunicornServer
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, make_leaf_image
    from serving_support import GunicornServer

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    with GunicornServer(tmp_path_factory.mktemp("browser"), workers=2,
                        env={"PLANTML_BUNDLE": str(tiny_bundle)}) as srv:
        yield srv


def test_upload_a_photo_and_see_the_label(browser, server, tmp_path):
    photo = tmp_path / "my leaf.jpg"
    make_leaf_image(TINY_CLASSES["Tomato___Late_blight"], size=256, seed=5).save(photo, quality=90)
    page = browser.new_page()
    external = []
    page.on("request", lambda req: None if req.url.startswith((server.base, "blob:", "data:"))
            else external.append(req.url))
    page.goto(server.url("/"))
    assert "Leaf disease check" in page.inner_text("h1")
    page.set_input_files("#file", str(photo))
    page.click("#submit")
    page.wait_for_selector("#label", timeout=30_000)
    assert page.get_attribute("#label", "data-label") == "Tomato___Late_blight"
    assert "Tomato - Late blight" in page.inner_text("#label")
    assert "%" in page.inner_text("#confidence")
    assert page.locator("#topk tr").count() == 1 + 3  # header + the tiny model's 3 classes
    assert page.is_visible("#preview")
    page.screenshot(path=str(tmp_path / "upload_page.png"), full_page=True)
    assert not external, f"page fetched external assets: {external}"
    page.close()


def test_bad_file_shows_an_error_not_a_crash(browser, server, tmp_path):
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("these are my notes, not a photo")
    page = browser.new_page()
    page.goto(server.url("/"))
    page.set_input_files("#file", str(bogus))
    page.click("#submit")
    page.wait_for_selector("#error", timeout=30_000)
    assert "not an image" in page.inner_text("#error")
    # the page still works for the next, good photo
    photo = tmp_path / "leaf.png"
    make_leaf_image(TINY_CLASSES["Apple___scab"], size=128, seed=2).save(photo)
    page.set_input_files("#file", str(photo))
    page.click("#submit")
    page.wait_for_selector("#label", timeout=30_000)
    assert page.get_attribute("#label", "data-label") == "Apple___scab"
    page.close()


def test_page_works_without_javascript(browser, server, tmp_path):
    photo = tmp_path / "leaf.jpg"
    make_leaf_image(TINY_CLASSES["Tomato___healthy"], size=200, seed=4).save(photo)
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(server.url("/"))
    page.set_input_files("#file", str(photo))
    page.click("#submit")
    page.wait_for_selector("#label", timeout=30_000)
    assert page.get_attribute("#label", "data-label") == "Tomato___healthy"
    context.close()
