"""The live page in a real browser: Debian's chromium, headless, driven by selenium through chromium-driver,
against a real `helios serve --model helios-tiny` (.ci/run installs both with apt)."""

import os
import shutil
import time

import pytest

from servers import ServerProcess

pytestmark = pytest.mark.slow  # the real server process

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER) and not os.environ.get("CI"):  # CI installs them (.ci/run): there it must run
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("serve")) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, script, timeout=180, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what or script} not true after {timeout} s; page errors: "
                       f"{driver.execute_script('return window.helios && window.helios.errors')}")


def _fill(driver, element_id, value):
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def test_the_page_plays_the_live_video_and_steers_it(server, browser, tmp_path):
    browser.get(server.url + "/")
    _wait(browser, "return document.getElementById('model').textContent === 'helios-tiny'", what="the model name")
    _fill(browser, "prompt", "a red fox running through fresh snow")
    _fill(browser, "size", "64x64")
    _fill(browser, "seconds", "5.5")  # 132 frames: 4 chunks
    _fill(browser, "seed", "3")
    browser.find_element("id", "start").click()
    mime = _wait(browser, "return window.helios.mime", what="video.start")
    # The stream's codec, as the server names it from the init segment, plays in this browser through MSE.
    assert mime.startswith('video/mp4; codecs="avc1.')
    assert browser.execute_script("return MediaSource.isTypeSupported(arguments[0])", mime) is True
    decoded = ("const v = document.getElementById('video'); "
               "return v.readyState >= 2 && v.getVideoPlaybackQuality().totalVideoFrames > 0 && v.currentTime")
    t0 = _wait(browser, decoded, what="decoded frames")
    _wait(browser, f"return document.getElementById('video').currentTime > {t0}", what="currentTime advancing")

    _fill(browser, "steer-prompt", "a blue whale in a dark ocean")
    _fill(browser, "transition", "0")
    browser.find_element("id", "steer").click()
    ack = _wait(browser, "return window.helios.acks[0]", what="session.interaction.queued")
    _wait(browser, "return window.helios.done", what="session.done")
    chunks = browser.execute_script("return window.helios.chunks")
    prompts = [c["prompt"]["prompt"] for c in chunks]
    changed = prompts.index("a blue whale in a dark ocean")
    # From the chunk after the one being made when the server acknowledged, every chunk has the new prompt.
    assert changed in (ack["chunks_seen"], ack["chunks_seen"] + 1) and len(prompts) == 4
    assert prompts == ["a red fox running through fresh snow"] * changed + ["a blue whale in a dark ocean"] * (4 - changed)
    assert browser.execute_script("return window.helios.errors") == []
    assert browser.find_element("id", "download").is_displayed()
    quality = browser.execute_script("return document.getElementById('video').getVideoPlaybackQuality()")
    assert quality["totalVideoFrames"] > 0
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("HELIOS_SCREENSHOT"):  # where a person wants to look at it
        shutil.copy(shot, os.environ["HELIOS_SCREENSHOT"])


def test_the_page_shows_errors_as_messages(server, browser):
    browser.get(server.url + "/")
    _fill(browser, "size", "80x64")  # not a multiple of 64
    browser.find_element("id", "start").click()
    _wait(browser, "return window.helios.errors.length", what="an error message")
    error = browser.find_element("id", "error")
    assert error.is_displayed() and "multiple of 64" in error.text


def test_with_an_api_key_the_page_works_with_the_key_as_a_basic_password(tmp_path, browser):
    """A browser cannot send a bearer token when it opens a page: the server's 401 asks for Basic credentials, the
    key as the password; the browser then sends them with the page's files and requests and its WebSocket."""
    key = "page-key"
    with ServerProcess(tmp_path / "keyed", "--api-key", key) as proc:
        browser.get(proc.url.replace("http://", f"http://helios:{key}@") + "/")
        _wait(browser, "return document.getElementById('model').textContent === 'helios-tiny'", what="the model")
        _fill(browser, "prompt", "a red fox")
        _fill(browser, "size", "64x64")
        _fill(browser, "seconds", "1")
        browser.find_element("id", "start").click()
        _wait(browser, "return window.helios.done", what="session.done over the keyed WebSocket")
        assert browser.execute_script("return window.helios.errors") == []
        assert len(browser.execute_script("return window.helios.chunks")) == 1
