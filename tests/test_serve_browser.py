"""The web chat at `/` in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium).

The page's streamed answer equals the API's greedy answer; Stop frees the slot (the server's running
count returns to 0); a wrong key shows an error, not a blank page; Enter sends and Shift+Enter adds a
line. The screenshot the README shows is saved here (docs/img/chat.png).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from serving import chat, post, serve_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-browser"
# The README's picture; rewritten only when asked (NANOSEEK_SAVE_SCREENSHOT=1), so a test run leaves the tree clean.
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "chat.png"


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium on PATH (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


pytestmark = [pytestmark, pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))]


@pytest.fixture(scope="module")
def served():
    s = serve_tiny(api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,640"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60, what: str = "the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settings(browser, **values: str) -> None:
    from selenium.webdriver.common.by import By

    if not browser.find_element(By.ID, "settings").is_displayed():
        browser.find_element(By.ID, "toggle-settings").click()
    for field, value in values.items():
        element = browser.find_element(By.ID, field.replace("_", "-"))
        element.clear()
        element.send_keys(value)


def ask(browser, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def answers(browser) -> list[str]:
    """The assistant answers' text exactly (WebElement.text would normalise whitespace)."""
    script = "return [...document.querySelectorAll('.message.assistant .answer')].map((e) => e.textContent)"
    return browser.execute_script(script)


def test_a_wrong_key_shows_an_error_not_a_blank_page(served, browser):
    from selenium.webdriver.common.by import By

    browser.get(served.url + "/")
    # the server needs a key: the settings open on their own
    wait_for(lambda: browser.find_element(By.ID, "settings").is_displayed(), timeout=10, what="the settings")
    settings(browser, api_key="sk-wrong")
    ask(browser, "hello")
    error = wait_for(lambda: browser.find_element(By.ID, "error").is_displayed(), what="the error")
    assert error and "API key" in browser.find_element(By.ID, "error").text
    assert answers(browser) == [] and browser.find_elements(By.CSS_SELECTOR, ".message.user")


def test_the_streamed_answer_is_the_apis_greedy_answer(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(served.url + "/")
    settings(browser, api_key=KEY, temperature="0", max_tokens="16", system="")
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("What is 12", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "+ 30?")  # Shift+Enter: a new line, not sent
    assert box.get_attribute("value") == "What is 12\n+ 30?" and not answers(browser)
    box.send_keys(Keys.ENTER)
    stats = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, ".message.assistant .stats").text, what="stats")
    assert "tokens/s" in stats and "first token" in stats
    body = chat("What is 12\n+ 30?", max_tokens=16)
    expected = json.loads(post(served.url, "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})[1])
    assert answers(browser) == [expected["choices"][0]["message"]["content"].lstrip()]
    browser.find_element(By.ID, "toggle-settings").click()  # settings closed for the picture
    wait_for(lambda: browser.find_element(By.ID, "model-name").text == "tiny-test", timeout=10, what="the model name")
    screenshot = README_SCREENSHOT if os.environ.get("NANOSEEK_SAVE_SCREENSHOT") == "1" else tmp_path / "chat.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    settings(browser)


def test_stop_mid_answer_frees_the_slot_and_new_chat_clears(served, browser):
    from selenium.webdriver.common.by import By

    engine, worker = served.engine, served.server.worker
    step, eos = engine.step, engine.eos_ids
    engine.step = lambda: (time.sleep(0.05), step())  # slow enough to press Stop mid-answer
    engine.eos_ids = []  # no early end: the answer runs until stopped
    try:
        settings(browser, max_tokens="100")
        ask(browser, "Count to a hundred")
        wait_for(lambda: worker.running == 1, what="the answer to start")
        wait_for(lambda: len(answers(browser)) == 2 and answers(browser)[-1], what="streamed text")
        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: worker.running == 0 and not engine.has_work, timeout=10, what="the slot to be freed")
        assert "stopped" in browser.find_elements(By.CSS_SELECTOR, ".message.assistant .stats")[-1].text
        assert browser.find_element(By.ID, "send").is_displayed()
    finally:
        engine.step, engine.eos_ids = step, eos
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []


def test_think_blocks_are_folded(served, browser):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "new-chat").click()
    bubble = browser.execute_script(
        "const b = addMessage('assistant', '<think>first, 2 + 2</think>It is 4.'); return b;"
    )
    details = bubble.find_element(By.TAG_NAME, "details")
    assert details.get_attribute("open") is None  # folded
    assert (
        browser.execute_script("return arguments[0].querySelector('.thinking').textContent", bubble) == "first, 2 + 2"
    )
    assert browser.execute_script("return arguments[0].querySelector('.answer').textContent", bubble) == "It is 4."
