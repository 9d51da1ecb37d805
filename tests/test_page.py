"""The page at `/` in a real browser (headless Chromium driven by Selenium), against the service
started as `make serve RUN=...` starts it: generate, explain, shading, neighbours, remove, restore.

`make test` installs Debian's chromium and chromium-driver when they are missing. The screenshots
are saved in test-output/ (the suite's output; CI keeps it).
"""

import os
import shutil
import subprocess
import sys
import time

import pytest
import requests

from conftest import REPO, audit_lines, free_port

ADMIN_TOKEN = "page-admin-token-0123456789"
OUTPUT = os.path.join(REPO, "test-output")
PROMPT = (
    "Python's for statement iterates over the items of any sequence, a list or a string, "
    "in the order that they appear. " * 2
)
WAIT_S = 240


@pytest.fixture(scope="module")
def served(db, retrofit_run, tmp_path_factory):
    """`python -m index_service --db DB --run RUN` (what `make serve RUN=...` runs) on a RETRO-fitted base, its
    own Ray, the admin token from the environment."""
    work = str(tmp_path_factory.mktemp("page") / "db")
    shutil.copytree(db, work)
    port = free_port()
    env = {**os.environ, "RETRO_ADMIN_TOKEN": f"page:{ADMIN_TOKEN}", "RAY_ADDRESS": ""}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "index_service",
            "--db",
            work,
            "--run",
            str(retrofit_run),
            "--port",
            str(port),
            "--embed-cpus",
            "0.5",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + WAIT_S
        while True:
            assert process.poll() is None, process.stdout.read()[-3000:]
            try:
                if requests.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the service did not start"
            time.sleep(1)
        yield url, work
    finally:
        os.killpg(process.pid, 9)
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver are needed: `make test` installs them"
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: condition(d), message=f"waited {timeout} s for {what}"
    )


def _status(driver) -> str:
    return driver.find_element("id", "status").text


def _shown(driver) -> list[dict]:
    """What the page shows: per chunk, its token spans (text, delta, colour) and its neighbours' documents."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#chunks .chunk')].map(c => ({
            tokens: [...c.querySelectorAll('.token')].map(t => ({text: t.textContent, delta: t.dataset.delta ?? null,
                                                                 colour: t.style.backgroundColor})),
            neighbours: [...c.querySelectorAll('.neighbour')].map(n => Number(n.dataset.docId)),
            sources: [...c.querySelectorAll('.neighbour .meta')].map(m => m.textContent)}));""")


def _renders(driver) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.renders || 0)"))


def _click_and_wait(driver, locator: tuple[str, str], says: list[str]):
    """Clicks, then waits for the page to show a new result (or to fail) and checks what its status says."""
    before, said = _renders(driver), _status(driver)  # a failure said before this click is not this click's
    driver.find_element(*locator).click()
    _wait(
        driver,
        lambda d: _renders(d) > before or ("failed" in _status(d) and _status(d) != said),
        f"a result after clicking {locator[1]}",
    )
    assert all(s in _status(driver) for s in says), _status(driver)


def test_the_page_generates_explains_shades_and_removes_and_restores_documents(served, browser):
    url, db = served
    os.makedirs(OUTPUT, exist_ok=True)
    browser.get(url + "/")
    _wait(browser, lambda d: "model step" in d.find_element("id", "info").text, "the page to load the service's info")

    # a prompt yields chunks with neighbours and shaded tokens, as the API gives them
    browser.find_element("id", "prompt").send_keys(PROMPT)
    browser.find_element("id", "max-new-tokens").clear()
    browser.find_element("id", "max-new-tokens").send_keys("80")
    _click_and_wait(browser, ("id", "generate"), ["generated"])
    shown = _shown(browser)
    api = requests.post(
        url + "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 80, "explain": True}, timeout=300
    ).json()
    assert len(shown) == len(api["chunks"]) >= 3
    assert [c["neighbours"] for c in shown] == [[n["doc_id"] for n in c["neighbours"]] for c in api["chunks"]]
    assert shown[0]["neighbours"] == [] and all(c["neighbours"] for c in shown[1:])
    assert all(
        c["sources"] and all("corpus.jsonl:" in s for s in c["sources"]) for c in shown[1:]
    )  # file:line of each neighbour
    tokens = [t for c in shown for t in c["tokens"]]
    assert "".join(t["text"] for t in tokens) == "".join(c["text"] for c in api["chunks"])
    assert "".join(c["text"] for c in api["chunks"]).startswith(PROMPT)
    deltas = [float(t["delta"]) for t in tokens if t["delta"] is not None]
    expected = [t["logprob"] - t["logprob_no_retrieval"] for t in api["tokens"][1:]]
    assert deltas == pytest.approx(expected, abs=1e-5)
    assert any(abs(d) > 1e-4 for d in deltas)
    assert all(
        t["colour"].startswith("rgba(37, 99, 235" if float(t["delta"]) >= 0 else "rgba(220, 38, 38")
        for t in tokens
        if t["delta"]
    )
    browser.save_screenshot(os.path.join(OUTPUT, "page-generate.png"))

    # removing a document needs the token: none, then a wrong one, change nothing
    victim = shown[1]["neighbours"][0]
    seen = len(audit_lines(db))
    remove = f"#chunks .neighbour[data-doc-id='{victim}'] button.remove"
    browser.find_element("css selector", remove).click()
    _wait(browser, lambda d: "needs the admin token" in _status(d), "the page to ask for the token")
    browser.find_element("id", "token").send_keys("not-the-token-0123456789")
    browser.find_element("id", "reason").send_keys("test: the page removes a document")
    browser.find_element("css selector", remove).click()
    _wait(browser, lambda d: "401" in _status(d), "the service to refuse a wrong token")
    assert len(audit_lines(db)) == seen

    # with the token: removed, audited, and the regenerated neighbours no longer show it
    browser.find_element("id", "token").clear()
    browser.find_element("id", "token").send_keys(ADMIN_TOKEN)
    _click_and_wait(browser, ("css selector", remove), [f"document {victim} removed", "generated"])
    entry = audit_lines(db)[-1]
    assert (entry["action"], entry["doc_ids"], entry["actor"], entry["reason"]) == (
        "delete",
        [victim],
        "token:page",
        "test: the page removes a document",
    )
    after = _shown(browser)
    assert all(victim not in c["neighbours"] for c in after) and after != shown
    assert browser.find_elements("css selector", f"#deletions li[data-doc-id='{victim}']")
    browser.save_screenshot(os.path.join(OUTPUT, "page-removed.png"))

    # restored from the deletions list: the first neighbours come back
    _click_and_wait(
        browser,
        ("css selector", f"#deletions li[data-doc-id='{victim}'] button.restore"),
        [f"document {victim} restored", "generated"],
    )
    assert audit_lines(db)[-1]["action"] == "restore" and not browser.find_elements(
        "css selector", f"#deletions li[data-doc-id='{victim}']"
    )
    assert [c["neighbours"] for c in _shown(browser)] == [c["neighbours"] for c in shown]

    # explain any text: every token scored, chunk by chunk
    browser.find_element("id", "explain-text").send_keys(PROMPT * 2)
    _click_and_wait(browser, ("id", "explain"), ["explained"])
    explained = _shown(browser)
    assert "".join(t["text"] for c in explained for t in c["tokens"]) == PROMPT * 2
    assert len(explained) >= 2 and explained[0]["neighbours"] == [] and explained[1]["neighbours"]
    browser.save_screenshot(os.path.join(OUTPUT, "page-explain.png"))
