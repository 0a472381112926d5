"""The web page of `mvit serve` in a real headless Chromium (selenium), against a real server with the
bundled model: classify a real image, show refusals in place, reach every control by keyboard, and
load nothing from anywhere but the server."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving import real_images, start_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"the page test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                "apt-get install chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (pip install selenium)")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

WAIT_S = 60  # the model answers in well under a second a request; this is for a loaded CI machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mvit serve` with the bundled model (heads dermmel, ham10000, ham10000-mel, ph2, ph2-mel; a gate)."""
    server = start_server(log=tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def heads(server) -> dict[str, list[str]]:
    """Each head's classes, as the API describes them."""
    return {head["name"]: head["classes"] for head in server.client.get("/v1/heads").raise_for_status().json()["heads"]}


@pytest.fixture
def browser(tmp_path, server, monkeypatch):
    """A fresh headless Chromium that never reaches beyond this machine, on the page."""
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 # without these Chromium calls Google's hosts, which CI machines may not reach
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(server.url + "/")
        wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#head-list input[name=head]"))
        yield driver
    finally:
        driver.quit()


def wait(driver, seconds: float = WAIT_S) -> WebDriverWait:
    return WebDriverWait(driver, seconds)


def classify(driver, *paths: Path) -> None:
    """Choose files through the real file input and press Classify."""
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(path.resolve()) for path in paths))
    driver.find_element(By.ID, "classify").click()


def card(driver, name: str):
    return wait(driver).until(lambda d: d.find_element(By.CSS_SELECTOR, f'.result[data-file="{name}"]'))


def overlay_loaded(driver, result) -> bool:
    """Whether the card's attention map has arrived and decoded."""
    return driver.execute_script("const img = arguments[0].querySelector('img.overlay'); return img.complete && img.naturalWidth > 0", result)


def page_problems(driver, server) -> str:
    """What the page showed and what the server logged, for a failed wait."""
    return f"page:\n{driver.find_element(By.TAG_NAME, 'main').text}\nserver log:\n{server.log.read_text()[-3000:]}"


@pytest.mark.real_data
@pytest.mark.skipif(not real_images(1), reason="needs the real dermoscopic images in ../shared/data (HAM10000)")
def test_a_real_image_gets_every_heads_answer_and_its_attention_map(browser, server, heads, tmp_path):
    [image] = real_images(1)
    classify(browser, image)
    result = card(browser, image.name)
    try:
        wait(browser).until(lambda d: all(result.find_elements(By.CSS_SELECTOR, f'.label[data-head="{head}"]') for head in heads))
        wait(browser).until(lambda d: overlay_loaded(d, result))
    except TimeoutException:
        pytest.fail(f"the answers or the attention map never showed\n{page_problems(browser, server)}")
    browser.save_screenshot(str(tmp_path / "page.png"))

    # the page shows what the API answers for the same file
    with image.open("rb") as stream:
        records = server.client.post("/v1/predict", files={"images": (image.name, stream, "image/jpeg")}).raise_for_status().json()
    for record in records:
        answer = result.find_element(By.CSS_SELECTOR, f'.answer[data-head="{record["head"]}"]')
        label = answer.find_element(By.CSS_SELECTOR, ".label").text
        assert label in heads[record["head"]], (record["head"], label)
        assert label == record["label"]
        for name, p in record["probabilities"].items():
            shown = float(answer.find_element(By.CSS_SELECTOR, f'tr[data-class="{name}"] .num').text)
            assert shown == pytest.approx(p, abs=1.5e-3), (record["head"], name)  # shown to 3 decimals
        if record["threshold"] is not None:
            assert f"{record['threshold']:.3f}" in answer.find_element(By.CSS_SELECTOR, ".rule").text
    assert not result.find_elements(By.CSS_SELECTOR, ".error")
    assert result.find_element(By.CSS_SELECTOR, "img.thumb").get_attribute("src").startswith("blob:")  # the local file
    assert browser.find_element(By.ID, "results").get_attribute("aria-live") == "polite"

    overlay = result.find_element(By.CSS_SELECTOR, "img.overlay")
    assert overlay.is_displayed()
    first_head = next(iter(heads))
    assert overlay.get_attribute("data-head") == first_head  # the first chosen head by default
    assert first_head in overlay.get_attribute("alt") and overlay.get_attribute("data-class") in overlay.get_attribute("alt")
    assert overlay.get_attribute("data-class") in heads[first_head]


@pytest.mark.parametrize("name", ["notes.txt", "fake.jpg"])
def test_a_file_that_is_not_an_image_shows_the_servers_sentence(browser, server, tmp_path, name):
    path = tmp_path / name
    path.write_text("Patient notes, not an image.\n")
    expected = server.client.post("/v1/predict", files={"images": (name, path.read_bytes())}).json()["error"]
    classify(browser, path)
    result = card(browser, name)
    try:
        alert = wait(browser).until(lambda d: result.find_element(By.CSS_SELECTOR, '.error[role="alert"]'))
    except TimeoutException:
        pytest.fail(f"no error was shown for {name}\n{page_problems(browser, server)}")
    assert alert.is_displayed() and alert.text == expected
    assert not result.find_elements(By.CSS_SELECTOR, ".label")
    assert not result.find_element(By.CSS_SELECTOR, "img.overlay").is_displayed()


def test_one_bad_file_does_not_keep_the_others_from_their_answers(browser, server, heads, tmp_path):
    from PIL import Image

    good, bad = tmp_path / "lesion.png", tmp_path / "notes.txt"
    Image.new("RGB", (96, 80), (150, 100, 80)).save(good)
    bad.write_text("not an image")
    classify(browser, bad, good)
    wait(browser).until(lambda d: card(d, "notes.txt").find_elements(By.CSS_SELECTOR, '.error[role="alert"]'))
    answered = card(browser, "lesion.png")
    wait(browser).until(lambda d: len(answered.find_elements(By.CSS_SELECTOR, ".label")) == len(heads))
    # a flat colour is nothing like a dermoscopic image: the warning shows exactly when the gate says so
    [record, *_] = server.client.post("/v1/predict", files={"images": (good.name, good.read_bytes())}).json()
    assert bool(answered.find_elements(By.CSS_SELECTOR, ".warning")) == (record["in_distribution"] is False)


def test_a_busy_server_is_asked_again_and_then_explained(browser, tmp_path):
    """503 with Retry-After: the page waits and retries, then says so (the server's answer is faked in
    the page, as a real server is hard to keep exactly that busy)."""
    browser.execute_script("""
        window.asked = 0;
        const real = window.fetch;
        window.fetch = (url, init) => {
            if (!String(url).endsWith("v1/predict")) return real(url, init);
            window.asked += 1;
            return Promise.resolve(new Response(JSON.stringify({error: "the server is busy; try again in 1 s"}),
                {status: 503, headers: {"Content-Type": "application/json", "Retry-After": "1"}}));
        };""")
    path = tmp_path / "lesion.png"
    path.write_bytes(b"not looked at")
    classify(browser, path)
    alert = wait(browser).until(lambda d: card(d, path.name).find_element(By.CSS_SELECTOR, '.error[role="alert"]'))
    assert "busy" in alert.text and "press Classify to try again" in alert.text
    assert browser.execute_script("return window.asked") == 4  # once, and three retries a second apart


def test_files_dropped_on_the_drop_zone_are_chosen(browser, server):
    browser.execute_script("""
        const dropped = new DataTransfer();
        dropped.items.add(new File(["not an image"], "dropped.jpg", {type: "image/jpeg"}));
        document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true}));""")
    assert "dropped.jpg" in browser.find_element(By.ID, "chosen").text
    assert browser.execute_script("return document.getElementById('file-input').files[0].name") == "dropped.jpg"
    browser.find_element(By.ID, "classify").click()
    alert = wait(browser).until(lambda d: card(d, "dropped.jpg").find_element(By.CSS_SELECTOR, '.error[role="alert"]'))
    assert "dropped.jpg is not an image" in alert.text


def test_the_controls_are_reached_with_tab_in_order(browser, heads):
    browser.execute_script("document.activeElement.blur()")  # start from the top of the page
    reached = []
    for _ in range(20):
        ActionChains(browser).send_keys(Keys.TAB).perform()  # a real key press, to whatever has focus
        reached.append(browser.execute_script(
            "const e = document.activeElement; return e.name === 'head' ? 'head:' + e.value : e.id"))
        if reached[-1] == "classify":
            break
    expected = ["drop-zone", "file-input", *(f"head:{name}" for name in heads), "classify"]
    assert [stop for stop in reached if stop in expected] == expected, reached
    # focus is visible: the focused button has an outline
    assert browser.execute_script("return getComputedStyle(document.activeElement).outlineStyle") != "none"
    # Enter and Space on the drop zone open the file picker (here: call the input's click, which opens it)
    browser.execute_script("window.picked = 0; document.getElementById('file-input').click = () => { window.picked += 1; }")
    zone = browser.find_element(By.ID, "drop-zone")
    zone.send_keys(Keys.ENTER)
    zone.send_keys(Keys.SPACE)
    assert browser.execute_script("return window.picked") == 2


def test_the_page_loads_nothing_from_elsewhere_and_breaks_no_csp(browser, server, heads, tmp_path):
    from PIL import Image

    path = tmp_path / "lesion.png"
    Image.new("RGB", (120, 90), (170, 110, 90)).save(path)
    classify(browser, path)
    result = card(browser, path.name)
    wait(browser).until(lambda d: overlay_loaded(d, result))
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(url.startswith((server.url + "/", "blob:" + server.url + "/")) for url in fetched), fetched
    assert any(url.endswith("/static/page.js") for url in fetched) and any(url.endswith("/static/page.css") for url in fetched)
    assert browser.execute_script("return getComputedStyle(document.body).fontFamily").startswith("system-ui")  # the CSS applied
    logged = browser.get_log("browser")
    assert not [entry for entry in logged if "Content Security Policy" in entry["message"] or entry["level"] == "SEVERE"], logged


def test_the_footer_says_research_use_only_and_links_the_api_docs(browser, server):
    footer = browser.find_element(By.TAG_NAME, "footer")
    assert "Research use only: not a medical device." in footer.text
    docs = footer.find_element(By.LINK_TEXT, "API docs")
    assert docs.get_attribute("href") == server.url + "/docs"


def test_a_server_with_a_token_asks_for_it_and_says_when_it_is_gone(browser, tmp_path):
    """The token field appears, the heads load once it is entered, and a server that has stopped
    gives a readable message rather than nothing."""
    from PIL import Image

    token = "a-token-of-sixteen-characters-or-more"
    guarded = start_server(log=tmp_path / "guarded.log", env={"MVIT_SERVE_TOKEN": token}, token=token)
    try:
        browser.get(guarded.url + "/")
        field = browser.find_element(By.ID, "token")
        wait(browser).until(lambda d: field.is_displayed())  # healthz said a token is needed
        assert not browser.find_elements(By.CSS_SELECTOR, "#head-list input")
        field.send_keys("not-the-token-at-all", Keys.TAB)  # the change event loads the heads, or says why not
        wait(browser).until(lambda d: "did not accept this access token" in d.find_element(By.ID, "heads-status").text)
        field.clear()
        field.send_keys(token, Keys.TAB)
        wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#head-list input[name=head]"))
        assert browser.execute_script("return sessionStorage.getItem('mvit-token')") == token
        path = tmp_path / "lesion.png"
        Image.new("RGB", (64, 64), (160, 110, 90)).save(path)
        classify(browser, path)
        wait(browser).until(lambda d: card(d, path.name).find_elements(By.CSS_SELECTOR, ".label"))
    finally:
        guarded.stop()
    browser.find_element(By.ID, "classify").click()  # again, with the server gone
    alert = wait(browser).until(lambda d: card(d, path.name).find_element(By.CSS_SELECTOR, '.error[role="alert"]'))
    assert "Could not reach the mvit server" in alert.text
