"""The page at `/` in headless Chromium (Debian's chromium and chromedriver, driven by Selenium),
against the real engine and the built-in model: type a prompt, see the text stream in with each
token coloured by its probability (the same text the API gives), chat, stop, and see the dashboard
count the requests. `.ci/run` installs the browser; elsewhere the test skips without one unless
VIBEE_REQUIRE_BROWSER is set."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile

import httpx
import pytest

from .harness import serve

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def page():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("VIBEE_REQUIRE_BROWSER"):
            pytest.fail("VIBEE_REQUIRE_BROWSER is set but chromium/chromedriver are not installed")
        pytest.skip("no chromium and chromedriver (apt install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from vibee.runtime.async_engine import AsyncEngine
    from vibee.runtime.config import EngineConfig
    from vibee.server.app import create_app

    engine = AsyncEngine.from_config(EngineConfig(device="cpu", cpu_kv_cache_gib=0.25, seed=0), progress=False)
    profile = tempfile.mkdtemp(prefix="vibee-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = None
    try:
        with serve(create_app(engine)) as url:
            driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
            driver.get(url + "/")
            yield driver, url
    finally:
        if driver is not None:
            driver.quit()
        asyncio.run(engine.shutdown(timeout=0.0))
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, predicate, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d))


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def set_value(driver, name, value):
    field = by_id(driver, name)
    field.clear()
    field.send_keys(str(value))


def test_completion_streams_with_coloured_tokens_and_the_dashboard_counts_it(page):
    driver, url = page
    wait(driver, lambda d: by_id(d, "model").get_attribute("data-ready") == "1")
    assert by_id(driver, "model").text == "vibee-tiny"
    wait(driver, lambda d: by_id(d, "stat-finished").get_attribute("data-value") not in (None, ""))
    finished_before = float(by_id(driver, "stat-finished").get_attribute("data-value"))

    by_id(driver, "mode-completion").click()
    set_value(driver, "prompt", "def parse_csv_line(line):")
    # 48 tokens: a stream long enough for several events even when the server merges the outputs
    # of a reader that fell behind (a loaded 2-core CI machine once saw 16 tokens come in 2 events).
    set_value(driver, "max-tokens", 48)
    set_value(driver, "temperature", 0)
    by_id(driver, "send").click()
    wait(driver, lambda d: by_id(d, "output").get_attribute("data-done"))
    output = by_id(driver, "output")
    assert output.get_attribute("data-done") == "length"
    assert int(output.get_attribute("data-chunks")) > 2  # streamed, not one body
    from selenium.webdriver.common.by import By

    spans = output.find_elements(By.CSS_SELECTOR, "span.tok")
    assert len(spans) == 48 and all(float(s.get_attribute("data-logprob")) <= 0 for s in spans)
    assert "background" in spans[0].get_attribute("style")
    # The page shows what the API answers for the same greedy request.
    api = httpx.post(url + "/v1/completions", json={"prompt": "def parse_csv_line(line):", "max_tokens": 48,
                                                    "temperature": 0, "logprobs": 0}).json()["choices"][0]
    assert driver.execute_script("return arguments[0].textContent", output) == api["text"]
    assert [round(float(s.get_attribute("data-logprob")), 3) for s in spans] == \
        [round(x, 3) for x in api["logprobs"]["token_logprobs"]]
    assert math.isclose(float(spans[0].get_attribute("data-logprob")), api["logprobs"]["token_logprobs"][0], abs_tol=1e-4)
    # The dashboard polls once a second: it counts the request.
    wait(driver, lambda d: float(by_id(d, "stat-finished").get_attribute("data-value") or 0) >= finished_before + 1)
    wait(driver, lambda d: by_id(d, "stat-ttft").get_attribute("data-value") not in (None, ""))
    assert int(by_id(driver, "stats").get_attribute("data-polls")) >= 2


def test_chat_keeps_the_conversation_and_stop_ends_a_stream(page):
    driver, _ = page
    from selenium.webdriver.common.by import By

    by_id(driver, "mode-chat").click()
    set_value(driver, "prompt", "Write a function that adds two numbers.")
    set_value(driver, "max-tokens", 12)
    by_id(driver, "send").click()
    wait(driver, lambda d: by_id(d, "output").get_attribute("data-done"))
    messages = driver.find_elements(By.CSS_SELECTOR, "#chat-log .msg")
    assert [m.get_attribute("class") for m in messages] == ["msg user", "msg assistant"]
    assert messages[1].text.startswith("assistant") and by_id(driver, "output").text
    # A long answer stopped from the page: the stream ends there, and the page is ready again.
    set_value(driver, "prompt", "And now a long one.")
    set_value(driver, "max-tokens", 900)
    by_id(driver, "send").click()
    wait(driver, lambda d: int(by_id(d, "output").get_attribute("data-chunks")) > 3)
    by_id(driver, "stop").click()
    wait(driver, lambda d: by_id(d, "output").get_attribute("data-done") == "stopped")
    assert by_id(driver, "status").text == "stopped" and by_id(driver, "send").is_enabled()


def test_a_refused_request_shows_the_servers_error(page):
    driver, _ = page
    by_id(driver, "mode-completion").click()
    set_value(driver, "prompt", "x")
    set_value(driver, "max-tokens", 100000)
    by_id(driver, "send").click()
    wait(driver, lambda d: by_id(d, "error").is_displayed())
    assert "maximum context length" in by_id(driver, "error").text
