"""Integration: a person's path through the upload page, in headless Chromium.

Covers issue 14 item 6: camera input (``capture``), several photos at once, drag and
drop, the in-browser downscale (longest side 1024, JPEG) and relative URLs behind an
ingress path prefix (a loopback proxy, ``tests.support.serving.PrefixProxy``, forwards
``/plantml/...`` to the server without the prefix, as a rewriting ingress does).

Chromium comes from Debian's ``chromium`` package (no browser download); it is driven
with the ``playwright`` PyPI package through ``executable_path``. Skips if either is
missing. The server is the real gunicorn.
"""

from __future__ import annotations

import base64
import shutil

import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from tests.support.serving import GunicornServer, PrefixProxy
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from support.serving import GunicornServer, PrefixProxy

pytestmark = pytest.mark.integration

LABELS = list(TINY_CLASSES)
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


PREFIX = "/plantml"
#: Records what the page hands to fetch(): each uploaded file's name, type, size and pixel size.
RECORD_UPLOADS = """
(() => {
  window.__uploads = [];
  const realFetch = window.fetch.bind(window);
  window.fetch = (url, init) => {
    const files = init && init.body instanceof FormData ? init.body.getAll("file") : [];
    return Promise.all(files.map(f => createImageBitmap(f).then(
        b => ({name: f.name, type: f.type, size: f.size, width: b.width, height: b.height}),
        () => ({name: f.name, type: f.type, size: f.size, width: 0, height: 0}))))
      .then(info => { window.__uploads.push({url: String(url), files: info}); return realFetch(url, init); });
  };
})();
"""


def _photo(tmp_path, label: str, name: str, size: int = 256, seed: int = 5):
    path = tmp_path / name
    make_leaf_image(TINY_CLASSES[label], size=size, seed=seed).save(path, quality=90)
    return path


def _cards(page) -> list[str]:
    page.wait_for_selector("#result .card", timeout=30_000)
    return [c.get_attribute("data-label") for c in page.query_selector_all("#result .card")]


def test_upload_a_photo_and_see_the_label(browser, server, tmp_path):
    photo = _photo(tmp_path, "Tomato___Late_blight", "my leaf.jpg")
    page = browser.new_page()
    external = []
    page.on("request", lambda req: None if req.url.startswith((server.base, "blob:", "data:"))
            else external.append(req.url))
    page.goto(server.url("/"))
    assert "Leaf disease check" in page.inner_text("h1")
    page.set_input_files("#file", str(photo))
    assert page.locator("#chosen img").count() == 1  # a thumbnail of what will be sent
    page.click("#submit")
    assert _cards(page) == ["Tomato___Late_blight"]
    assert "Tomato - Late blight" in page.inner_text("#result .card .label")
    assert "%" in page.inner_text("#result .card .confidence")
    assert page.locator("#result .card .topk tr").count() == 1 + 3  # header + the tiny model's 3 classes
    page.screenshot(path=str(tmp_path / "upload_page.png"), full_page=True)
    assert not external, f"page fetched external assets: {external}"
    page.close()


def test_camera_input_and_several_photos_at_once(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto(server.url("/"))
    assert page.get_attribute("#camera", "capture") == "environment"
    assert page.get_attribute("#camera", "accept") == "image/*"
    assert page.get_attribute("#file", "multiple") is not None
    picked = [_photo(tmp_path, lab, f"{i}-{lab}.jpg", seed=20 + i) for i, lab in enumerate(LABELS)]
    page.set_input_files("#file", [str(p) for p in picked[:2]])
    page.set_input_files("#camera", str(picked[2]))  # a photo taken with the camera is added to the list
    assert page.locator("#chosen li").count() == 3
    assert "3 leaves" in page.inner_text("#submit")
    page.click("#submit")
    assert _cards(page) == LABELS
    assert [n.strip() for n in page.locator("#result .card .filename").all_inner_texts()] == [p.name for p in picked]
    page.click("#clear")
    assert page.locator("#chosen li").count() == 0
    page.close()


def test_drag_and_drop(browser, server):
    page = browser.new_page()
    page.goto(server.url("/"))
    data = base64.b64encode(jpeg_bytes(make_leaf_image(TINY_CLASSES["Apple___scab"], size=200, seed=3))).decode()
    transfer = page.evaluate_handle("""([b64, name]) => {
        const bin = atob(b64), bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: "image/jpeg"}));
        return dt;
    }""", [data, "dropped.jpg"])
    page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert page.locator("#chosen li").count() == 1
    page.click("#submit")
    assert _cards(page) == ["Apple___scab"]
    page.close()


def test_large_photo_is_shrunk_in_the_browser(browser, server, tmp_path):
    """A 12 MP phone photo goes up as a JPEG of longest side 1024; a small one goes up untouched."""
    big = tmp_path / "phone.jpeg"
    make_leaf_image(TINY_CLASSES["Tomato___healthy"], size=128, seed=8).resize((4000, 3000)).save(big, quality=85)
    small = _photo(tmp_path, "Apple___scab", "small.jpg", size=300)
    page = browser.new_page()
    page.add_init_script(RECORD_UPLOADS)
    page.goto(server.url("/"))
    page.set_input_files("#file", [str(big), str(small)])
    page.click("#submit")
    assert _cards(page) == ["Tomato___healthy", "Apple___scab"]
    (upload,) = page.evaluate("window.__uploads")
    assert upload["url"] == "predict"  # relative
    sent_big, sent_small = upload["files"]
    assert (sent_big["width"], sent_big["height"]) == (1024, 768)
    assert sent_big["type"] == "image/jpeg" and sent_big["name"] == "phone.jpg"
    assert sent_big["size"] < big.stat().st_size
    assert (sent_small["width"], sent_small["height"], sent_small["size"]) == (300, 300, small.stat().st_size)
    page.close()


def test_works_behind_an_ingress_path_prefix(browser, server, tmp_path):
    """Served at /plantml/ through a prefix-stripping proxy, every request the page makes stays under it."""
    with PrefixProxy(server.base, PREFIX) as ingress:
        page = browser.new_page()
        page.goto(ingress.base + "/")
        assert "Leaf disease check" in page.inner_text("h1")
        assert page.evaluate("getComputedStyle(document.querySelector('main')).backgroundColor") \
            == "rgb(255, 255, 255)"  # the stylesheet came through the prefix
        assert page.eval_on_selector("#upload", "f => f.action") == ingress.base + "/"
        page.set_input_files("#file", str(_photo(tmp_path, "Tomato___healthy", "leaf.jpg")))
        page.click("#submit")
        assert _cards(page) == ["Tomato___healthy"]
        page.close()
        # without JavaScript the form posts through the prefix too
        context = browser.new_context(java_script_enabled=False)
        page = context.new_page()
        page.goto(ingress.base + "/")
        page.set_input_files("#file", str(_photo(tmp_path, "Apple___scab", "other.jpg", seed=9)))
        page.click("#submit")
        assert _cards(page) == ["Apple___scab"]
        context.close()
    assert not ingress.outside, f"the page left the prefix: {ingress.outside}"
    assert {PREFIX + p for p in ("/", "/static/style.css", "/static/app.js", "/predict")} <= set(ingress.seen)


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
    page.click("#clear")
    photo = tmp_path / "leaf.png"
    make_leaf_image(TINY_CLASSES["Apple___scab"], size=128, seed=2).save(photo)
    page.set_input_files("#file", str(photo))
    page.click("#submit")
    assert _cards(page) == ["Apple___scab"]
    page.close()


def test_page_works_without_javascript(browser, server, tmp_path):
    photos = [_photo(tmp_path, "Tomato___healthy", "leaf.jpg", size=200, seed=4),
              _photo(tmp_path, "Apple___scab", "other.jpg", size=200, seed=6)]
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(server.url("/"))
    assert page.is_visible("#file") and page.is_visible("#camera")  # native inputs without JavaScript
    page.set_input_files("#file", [str(p) for p in photos])  # the camera input stays empty
    page.click("#submit")
    assert _cards(page) == ["Tomato___healthy", "Apple___scab"]
    context.close()
