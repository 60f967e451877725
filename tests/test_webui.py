"""The web chat page at /: served as package data with a strict CSP, off with --no-webui, public
under --api-key (its API calls carry the key); and in a real browser (headless Debian chromium
driven by playwright): the key asked for, a message sent, the reply streamed in, the nodes and
/props shown, model output rendered as text, never as markup. A failing browser test leaves a
screenshot in its tmp dir."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
from serverproc import start_server
from synth import write_model

KEY = "webui-secret"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("webui") / "synth.gguf"
    write_model(path, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=5)
    return path


@pytest.fixture(scope="module")
def server(synth):
    srv, url = start_server(["-m", str(synth), "-c", "512", "--ignore-eos", "--metrics", "-a", "synth",
                             "--api-key", KEY, "-t", "1"])
    yield url
    srv.stop()


# -- over HTTP ----------------------------------------------------------------------------------
def test_page_is_served_without_a_key_and_references_nothing_outside(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<title>llamarpc</title>" in html
    # no CDN, no external script or style: every src/href is relative or a fragment
    for url in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html):
        assert not re.match(r"(?:[a-z]+:)?//", url), url
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp.split(
        "script-src")[1].split(";")[0]
    assert httpx.get(server + "/index.html").text == html
    # the API itself still wants the key
    r = httpx.get(server + "/props")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/props", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_no_webui_is_a_404(synth):
    srv, url = start_server(["-m", str(synth), "-c", "256", "--no-webui", "-t", "1"])
    try:
        r = httpx.get(url + "/")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == 404
    finally:
        srv.stop()


def test_webui_flags_parse(monkeypatch):
    from llamarpc.frontend.cli.args import build_parser

    p = build_parser()
    assert p.parse_args(["-m", __file__]).webui is True
    assert p.parse_args(["-m", __file__, "--no-webui"]).webui is False
    monkeypatch.setenv("LLAMA_ARG_NO_WEBUI", "1")
    assert p.parse_args(["-m", __file__]).webui is False


def test_page_is_package_data():
    import tomllib

    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "static/*.html" in data["llamarpc.frontend.api"]
    assert (root / "frontend" / "api" / "static" / "index.html").is_file()


# -- in a browser -------------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium installed (apt-get install -y chromium; .ci/run installs it)")


@pytest.fixture
def page(tmp_path):
    exe = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--disable-gpu", "--disable-extensions", "--renderer-process-limit=1"])
        try:
            pg = browser.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.errors = errors
            yield pg
            if errors:
                raise AssertionError(f"script errors on the page: {errors}")
        except BaseException:
            try:
                shot = tmp_path / "failure.png"
                pg.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the failing page: {shot}")
            except Exception:   # noqa: BLE001 - the screenshot is best effort; the failure is what matters
                pass
            raise
        finally:
            browser.close()


def _expect():
    # the page's CSP forbids eval, so no wait_for_function: playwright's own waits
    from playwright.sync_api import expect
    return expect


def _send(page, text: str):
    done = page.locator(".msg.assistant.done")
    before = done.count()
    page.fill("#input", text)
    page.click("#send")
    _expect()(done).to_have_count(before + 1, timeout=60_000)
    return done.last


def test_chat_streams_with_the_key(server, page):
    page.goto(server + "/")
    # the nodes table comes from /health (public): the in-process node, attached
    page.wait_for_selector("#nodes td.state-attached", timeout=30_000)
    page.fill("#maxTokens", "64")
    page.fill("#temperature", "0")
    # without the key: the server's 401 shown on the turn
    reply = _send(page, "Hi")
    assert "Invalid API Key" in reply.inner_text() and "error" in reply.get_attribute("class")
    page.fill("#apiKey", KEY)
    page.dispatch_event("#apiKey", "change")
    expect = _expect()
    expect(page.locator("#status")).to_contain_text("synth", timeout=30_000)
    props = json.loads(page.text_content("#props"))
    assert props["model_alias"] == "synth" and props["total_slots"] == 1
    # watch the reply's text grow: more than one length means it was streamed, not set at the end
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const b = document.querySelectorAll('.msg.assistant .body');
            if (b.length) window.__lengths.push(b[b.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    reply = _send(page, "Hello there")
    assert "error" not in reply.get_attribute("class")
    assert "finish: length" in reply.inner_text()
    lengths = page.evaluate("window.__lengths")
    assert len({n for n in lengths if n > 0}) >= 2, lengths
    # the key is sent as a Bearer header on every API call: the throughput line came from /metrics
    expect(page.locator("#throughput")).to_contain_text("generation", timeout=30_000)


def test_model_output_is_text_not_markup(server, page):
    """A reply full of HTML and script is shown as text; markdown (code fences, bold, lists) is
    built as elements; a javascript: link stays text."""
    evil = ('Hi <img src=x onerror="window.pwnd=1"> <script>window.pwnd=2</script>\n\n'
            "**bold** and `code` and [click](javascript:window.pwnd=3) and [ok](https://example.org/)\n\n"
            "- one\n- two\n\n```python\nprint('<b>x</b>')\n```\n")
    chunks = [{"choices": [{"index": 0, "delta": {"content": evil[i:i + 7]}, "finish_reason": None}]}
              for i in range(0, len(evil), 7)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "timings": {"predicted_n": len(chunks), "predicted_per_second": 10.0}})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    page.goto(server + "/")
    reply = _send(page, "show me")
    msg = page.locator(".msg.assistant .body").last
    assert msg.locator("img").count() == 0 and msg.locator("script").count() == 0
    assert page.evaluate("window.pwnd") is None
    assert "<img src=x" in msg.inner_text()
    assert msg.locator("strong").inner_text() == "bold"
    assert msg.locator("li").count() == 2
    assert msg.locator("pre code.language-python").inner_text() == "print('<b>x</b>')"
    links = msg.locator("a")
    assert links.count() == 1 and links.first.get_attribute("href") == "https://example.org/"
    assert "finish: stop" in reply.inner_text() and "10.0 tokens/s" in reply.inner_text()
