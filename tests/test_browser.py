"""The browser page end to end in real headless Chromium (Debian's chromium + chromium-driver, via selenium).

The page decodes a WAV file with Web Audio at 16 kHz, streams float32 chunks in real time to the server, and
shows the words as they arrive. The expected words are computed here with the engine on the same samples.
Skipped, with the reason, where chromium, chromedriver or selenium is missing (``make setup`` installs them as root).
"""

import os
import shutil

import numpy as np
import pytest
import soundfile as sf
from fixtures_models import offline_words, untied_tiny

from simul_agents.live import Limits, LiveStream
from simul_agents.serve import BackgroundServer, ServeConfig, Translator
from streaming_llm.heads import make_head

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    SELENIUM = True
except ImportError:
    SELENIUM = False

MISSING = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER), ("selenium", SELENIUM))
           if not found]  # fmt: skip
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs {', '.join(MISSING)}: apt-get install chromium chromium-driver (make setup does it as root), "
        "pip install -r requirements.txt",
    ),
]
LIMITS = Limits(max_target_tokens=64)  # enough for wait-k to write words that depend on the later audio
SECONDS = 1.6


def wait_k_words(model, audio, k):
    """wait-k's words do not depend on how the audio is chunked (it decides on whole encoder blocks)."""
    stream = LiveStream(model, make_head("wait-k", k=k), LIMITS)
    for i in range(0, len(audio), 1600):
        stream.push_audio(audio[i : i + 1600])
        stream.drain()
    stream.finish()
    stream.drain()
    return stream.words


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    t = np.arange(int(16000 * SECONDS)) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1300 * t + 1) * np.sin(2 * np.pi * 0.7 * t)
    path = root / "speech.wav"
    sf.write(path, tone, 16000, subtype="PCM_16")
    audio, rate = sf.read(path, dtype="float32")  # exactly the samples Web Audio decodes from this file
    assert rate == 16000
    model = untied_tiny("speech")
    translator = Translator(model, None, ServeConfig(limits=LIMITS))
    with BackgroundServer(translator) as server:
        yield {"model": model, "audio": audio, "path": path, "server": server}


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio"):  # fmt: skip
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not download: the driver path is explicit
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def translate_in_page(browser, setup, head: str, params: str = "") -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(setup["server"].http_url)
    Select(browser.find_element(By.ID, "head")).select_by_visible_text(head)
    browser.find_element(By.ID, "params").send_keys(params)
    browser.find_element(By.ID, "file").send_keys(str(setup["path"]))
    browser.find_element(By.ID, "start-file").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "translation").get_attribute("data-done") == "1"
        or d.find_element(By.ID, "error").text
    )
    return browser.execute_script(
        """const words = [...document.querySelectorAll('#translation .w')];
        return {words: words.map((w) => w.firstChild.textContent),
                delays: words.map((w) => w.querySelector('sub').textContent),
                error: document.getElementById('error').textContent,
                latency: document.getElementById('latency').textContent,
                status: document.getElementById('status').textContent};"""
    )


def test_page_streams_a_file_and_shows_the_offline_decode(browser, setup):
    shown = translate_in_page(browser, setup, "offline")
    expected = offline_words(setup["model"], setup["audio"], LIMITS.max_target_tokens)
    assert shown["error"] == ""
    assert expected and shown["words"] == expected
    assert shown["delays"] == [f"{SECONDS:.2f}s"] * len(expected)  # the offline head writes after the whole file
    assert "AL 1600 ms" in shown["latency"] and "computation-aware AL" in shown["latency"]
    assert shown["status"] == "done"


def test_page_shows_wait_k_words_as_the_audio_arrives(browser, setup):
    shown = translate_in_page(browser, setup, "wait-k", "k=2")
    assert shown["error"] == ""
    assert shown["words"] == wait_k_words(setup["model"], setup["audio"], k=2)
    early = [d for d in shown["delays"] if float(d.rstrip("s")) < SECONDS]
    assert early, f"wait-2 writes words before the file ends: delays {shown['delays']}"
    assert "median" in shown["latency"]
