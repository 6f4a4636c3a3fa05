"""The built-in web page in a real browser: Debian's chromium, driven by Playwright, with a fake
microphone playing a WAV file, against a real `lockstep serve` process. What the page did is read
from the counters it exposes (window.lockstepStats); what the server did, from GET /v1/sessions."""
import os
import shutil
import signal
import subprocess
import urllib.request

import pytest

from engine.config import ConfigError, ServeConfig
from servers import LiveServer, http

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
FAKE_MIC = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
SECOND = 24000


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright
    assert shutil.which(CHROMIUM), "Debian's chromium is missing: `make install` installs it"
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright, wav_inputs):
    # The longest input, which chromium loops: a voice-like signal for as long as the call runs.
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                   args=[*FLAGS, *FAKE_MIC, f"--use-file-for-fake-audio-capture={wav_inputs[2]}"])
    yield b
    b.close()


@pytest.fixture(scope="module")
def server(tiny_wrap_ckpt, tmp_path_factory):
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "2", "--idle-timeout", "120")
    yield srv
    srv.stop()


@pytest.fixture
def new_page(browser):
    """`new_page(**options)`: a page closed when the test ends, passed or not (a page left in a
    call would hold a slot of the module's server through the tests that follow)."""
    made = []

    def make(**options):
        made.append(browser.new_page(**options))
        return made[-1]

    yield make
    for page in made:
        page.close()


def stats(page) -> dict:
    return page.evaluate("window.lockstepStats")


def wait_for(page, condition: str, timeout_s: float = 60) -> None:
    page.wait_for_function(f"(() => {{ const s = window.lockstepStats; return {condition}; }})()",
                           timeout=timeout_s * 1000)


def gone(server: LiveServer, timeout: float = 5) -> bool:
    """Whether every session on the server has ended within `timeout` seconds."""
    return server.wait_idle(timeout)


def test_the_page_talks_to_moshi_and_hangs_up(server, new_page):
    page = new_page(viewport={"width": 860, "height": 900})
    page.goto(f"{server.url}/")
    assert page.title() == "lockstep · talk to Moshi"
    page.click("#settings summary")
    assert page.locator("#temperature").is_visible() and page.locator("#key-row").is_hidden()  # no key wanted
    page.click("#settings summary")
    page.click("#connect")
    wait_for(page, f"s.playedSamples >= 3 * {SECOND} && s.transcript.length > 0")
    s = stats(page)
    assert s["state"] == "in-call" and s["sentFrames"] > 0 and s["firstAudioMs"] is not None
    assert page.locator("#download").is_hidden() and page.locator("#message").is_hidden()
    assert page.locator("#transcript").inner_text().strip()
    (status,) = server.sessions()
    assert status["state"] == "running" and status["frames_out"] > 3 * 12.5
    if os.environ.get("LOCKSTEP_SCREENSHOT"):  # the picture in docs/web.md
        page.screenshot(path=os.environ["LOCKSTEP_SCREENSHOT"], clip={"x": 50, "y": 0, "width": 760, "height": 520})
    page.click("#connect")  # hang up
    assert gone(server)
    s = stats(page)
    assert s["state"] == "ended" and s["downloadBytes"] > 44
    assert page.locator("#download").is_visible()
    with page.expect_download() as download:
        page.click("#download")
    assert os.path.getsize(download.value.path()) == s["downloadBytes"]


# A browser that cannot connect a microphone to a context at another rate than its own (Firefox):
# the page falls back to the default rate and its worklets resample to and from 24 kHz.
ONE_RATE_BROWSER = """
const Native = window.AudioContext;
window.AudioContext = class extends Native {
  constructor(options = {}) { super({ latencyHint: options.latencyHint }); this.asked = options.sampleRate; }
  createMediaStreamSource(stream) {
    if (this.asked && this.asked !== this.sampleRate) throw new DOMException("rates differ", "NotSupportedError");
    return super.createMediaStreamSource(stream);
  }
};
"""


def test_the_worklets_resample_where_the_context_cannot_run_at_24k(server, new_page):
    page = new_page()
    page.add_init_script(ONE_RATE_BROWSER)
    page.goto(f"{server.url}/")
    page.click("#connect")
    wait_for(page, f"s.playedSamples >= {SECOND} && s.sentFrames >= 12")
    assert stats(page)["contextRate"] != 24000
    page.click("#connect")
    assert gone(server)


def test_built_in_files_are_served_and_static_replaces_them(server, tiny_wrap_ckpt, tmp_path):
    for path, kind in (("/", "text/html"), ("/app.js", "javascript"), ("/worklets.js", "javascript"),
                       ("/style.css", "text/css"), ("/page-config.json", "application/json")):
        with urllib.request.urlopen(f"{server.url}{path}", timeout=5) as r:
            assert kind in r.headers["content-type"], path
    (tmp_path / "index.html").write_text("<title>another UI</title>")
    other = LiveServer(tiny_wrap_ckpt, "--no-warmup", "--static", str(tmp_path))
    try:
        assert b"another UI" in http("GET", other.url + "/")[1]
        assert "--static page at /" in other.log()
    finally:
        other.stop()


def test_busy_server_wrong_key_and_lost_connection_are_said(tiny_wrap_ckpt, tmp_path, browser):
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "1", "--no-warmup", "--api-key", "sekret",
                     "--admission-wait", "0.2", "--idle-timeout", "120")
    try:
        first, second = browser.new_page(), browser.new_page()
        for page in (first, second):
            page.goto(f"{srv.url}/")
            # The server wants a key: the settings open on the key field.
            page.wait_for_selector("#api-key", state="visible")
        second.fill("#api-key", "wrong")
        second.click("#connect")
        wait_for(second, 's.state === "failed"', 20)
        assert "refused the API key" in second.locator("#message").inner_text()
        first.fill("#api-key", "sekret")
        first.click("#connect")
        wait_for(first, f"s.receivedSamples >= {SECOND}")
        second.fill("#api-key", "sekret")
        second.click("#connect")
        wait_for(second, 's.state === "failed"', 20)
        assert "busy" in second.locator("#message").inner_text()
        for pid in srv.pids()["api"]:  # the server's connections die mid-call
            os.kill(pid, signal.SIGKILL)
        wait_for(first, 's.state === "failed"', 20)
        assert "connection to the server was lost" in first.locator("#message").inner_text()
    finally:
        srv.stop()


def test_a_denied_microphone_is_said(playwright, server):
    # No fake-UI flag: headless chromium then answers the permission prompt itself, with a no.
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                   args=[*FLAGS, "--use-fake-device-for-media-stream"])
    try:
        page = b.new_page()
        page.goto(f"{server.url}/")
        page.click("#connect")
        wait_for(page, 's.state === "failed"', 20)
        assert "microphone is not available" in page.locator("#message").inner_text()
        assert server.sessions() == []  # no slot was taken for it
    finally:
        b.close()


def test_the_page_works_over_https_with_a_certificate(playwright, tiny_wrap_ckpt, tmp_path, wav_inputs):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "1", "--no-warmup", "--ssl-certfile", str(cert),
                     "--ssl-keyfile", str(key), "--idle-timeout", "120")
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        *FLAGS, *FAKE_MIC, f"--use-file-for-fake-audio-capture={wav_inputs[0]}"])
    try:
        assert f"serving https://127.0.0.1:{srv.port}" in srv.log()  # the start-up line says so
        page = b.new_context(ignore_https_errors=True).new_page()  # self-signed
        page.goto(f"https://localhost:{srv.port}/")
        page.click("#connect")
        wait_for(page, f"s.receivedSamples >= {SECOND}")
        assert page.evaluate("window.isSecureContext")
        page.click("#connect")
        assert gone(srv)
    finally:
        b.close()
        srv.stop()


def test_tls_flags_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        ServeConfig(ssl_certfile=__file__).validate()
    with pytest.raises(ConfigError, match="is not a file"):
        ServeConfig(ssl_certfile=str(tmp_path / "no.pem"), ssl_keyfile=__file__).validate()
