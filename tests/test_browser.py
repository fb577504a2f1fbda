"""The pages in a real browser (Debian's chromium + chromedriver through selenium): the playground
adapts to drawings made with mouse events, and the runs page starts a training and follows it live.

Screenshots of each page go to the test's tmp folder and, when ``MAML_SCREENSHOT_DIR`` is set,
there too (that is how docs/img/ is made).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import LETTERS, REPO, TINY, glyph, make_glyph_folder, needs_fonts, tiny

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SERVER_START_SECONDS = 90  # limits on waiting, never asserted as speeds
ADAPT_SECONDS = 60
TRAIN_SECONDS = 180
STEPS = 5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(work_dir: Path, data_dir: Path) -> Iterator[str]:
    """serve.py as a child process on a free loopback port; always stopped afterwards."""
    port = _free_port()
    log = (work_dir.parent / f"serve-{port}.log").open("w")
    command = [sys.executable, str(REPO / "serve.py"), "--port", str(port)]
    command += ["--work_dir", str(work_dir), "--data_dir", str(data_dir)]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            assert process.poll() is None, Path(log.name).read_text()
            try:
                with urllib.request.urlopen(f"{url}/api/runs", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "serve.py did not answer in time"
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    except WebDriverException as error:
        pytest.skip(f"chromium does not start here: {error.msg}")
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> None:
    """A PNG of the whole page (the window grows to the page's height for the shot)."""
    height, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(1400, max(1000, height + chrome))
    driver.execute_script("window.scrollTo(0, 0)")
    targets = [tmp_path / f"{name}.png"]
    if os.environ.get("MAML_SCREENSHOT_DIR"):
        targets.append(Path(os.environ["MAML_SCREENSHOT_DIR"]) / f"{name}.png")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(target)), target
    driver.set_window_size(1400, 1000)


def wait(driver, seconds: float, condition: Callable, message: str):
    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition, message)


def data(driver, selector: str, name: str) -> str | None:
    return driver.find_element(By.CSS_SELECTOR, selector).get_attribute(f"data-{name}")


# -- playground ------------------------------------------------------------------------------------
def draw(driver, canvas, variant: int) -> None:
    """Two strokes with real mouse events, shaped by ``variant`` modulo 5 (so query i is drawn
    like the support of class i, and the classes differ)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    size = canvas.size["width"]
    unit = size / 10  # offsets from the canvas centre, in tenths of its width
    bend = (variant % 5) - 2
    actions = ActionChains(driver, duration=10)
    actions.move_to_element_with_offset(canvas, int(-3 * unit), int(-3 * unit + bend * unit / 2))
    actions.click_and_hold()
    for dx, dy in ((2, bend), (2, -bend), (2, 3)):
        actions.move_by_offset(int(dx * unit), int(dy * unit / 2))
    actions.release()
    actions.move_to_element_with_offset(canvas, int(bend * unit), int(-3 * unit))
    actions.click_and_hold()
    for dy in (2, 2, 2):
        actions.move_by_offset(int(-bend * unit / 3), int(dy * unit))
    actions.release()
    actions.perform()


def adapt_count(driver) -> int:
    return int(data(driver, "#playground", "adapt-count"))


def wait_for_adapt(driver, after: int) -> None:
    """Until an adaptation newer than ``after`` is shown and none is pending."""
    wait(
        driver,
        ADAPT_SECONDS,
        lambda d: adapt_count(d) > after and data(d, "#playground", "state") == "done",
        "the playground did not adapt",
    )


def query_probabilities(driver) -> list[list[list[float]]]:
    """Each filled query's probabilities [step][class], as the page holds them."""
    results = driver.find_elements(By.CSS_SELECTOR, ".query-result[data-probabilities]")
    return [json.loads(r.get_attribute("data-probabilities")) for r in results]


def shown_bars(driver) -> list[list[float]]:
    """The bar chart values of every query at the step the page shows."""
    return [
        [
            float(bar.get_attribute("data-value"))
            for bar in r.find_elements(By.CSS_SELECTOR, "rect.bar")
        ]
        for r in driver.find_elements(By.CSS_SELECTOR, ".query-result[data-probabilities]")
    ]


def show_step(driver, step: int) -> None:
    driver.execute_script(
        "const s = document.getElementById('view-step'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input'));",
        step,
    )


def flat(rows) -> list[float]:
    return [value for row in rows for value in row]


def assert_distributions(probabilities: list, queries: int, n_way: int, steps: int) -> None:
    assert len(probabilities) == queries
    for per_step in probabilities:
        assert len(per_step) == steps + 1
        for p in per_step:
            assert len(p) == n_way
            assert all(0 <= v <= 1 for v in p)
            assert sum(p) == pytest.approx(1, abs=1e-3)


# The next POST /api/adapt gets 503 with Retry-After: 1; every text of the status line is kept.
BUSY_ONCE = """
const realFetch = window.fetch;
window.answeredBusy = false;
window.fetch = (url, init) => {
  if (url === "/api/adapt" && !window.answeredBusy) {
    window.answeredBusy = true;
    const body = JSON.stringify({detail: [{field: null, message: "busy"}]});
    return Promise.resolve(new Response(body, {status: 503, headers: {"Retry-After": "1"}}));
  }
  return realFetch(url, init);
};
window.statusTexts = [];
const status = document.getElementById("adapt-status");
new MutationObserver(() => window.statusTexts.push(status.textContent))
  .observe(status, {childList: true, characterData: true, subtree: true});
"""


def test_playground_adapts_to_drawings(browser, omniglot_dir, tmp_path):
    from metalearn.training.trainer import train

    work = tmp_path / "work"
    config = tiny(omniglot_dir, work, run_name="drawn", epochs=3)
    train(config)
    n_way, k_spt = config["n_way"], config["k_spt"]
    with serve(work, omniglot_dir) as url:
        browser.get(url + "/")
        wait(browser, 30, lambda d: data(d, "#playground", "state") == "ready", "no run to pick")
        assert "drawn" in browser.find_element(By.ID, "run-info").text
        support = browser.find_elements(By.CSS_SELECTOR, ".cell.support canvas.draw")
        queries = browser.find_elements(By.CSS_SELECTOR, ".cell.query canvas.draw")
        assert len(support) == n_way * k_spt and len(queries) >= 1
        for index, canvas in enumerate(support + queries):
            draw(browser, canvas, index)
        cells = browser.find_elements(By.CSS_SELECTOR, ".cell")
        assert all(c.get_attribute("data-filled") == "true" for c in cells)

        # every cell filled: it adapts by itself (no click on Adapt)
        wait_for_adapt(browser, 0)
        before = query_probabilities(browser)
        assert_distributions(before, len(queries), n_way, STEPS)

        # the bars show the chosen step, and the inner steps change them
        show_step(browser, 0)
        at_start = shown_bars(browser)
        show_step(browser, STEPS)
        at_end = shown_bars(browser)
        assert flat(at_start) == pytest.approx(flat(p[0] for p in before), abs=1e-9)
        assert flat(at_end) == pytest.approx(flat(p[STEPS] for p in before), abs=1e-9)
        assert flat(at_start) != pytest.approx(flat(at_end), abs=1e-4)
        screenshot(browser, tmp_path, "playground")

        # more ink on query 1 re-adapts by itself, and its chart changes
        count = adapt_count(browser)
        draw(browser, queries[0], 7)
        wait_for_adapt(browser, count)
        after = query_probabilities(browser)
        assert_distributions(after, len(queries), n_way, STEPS)
        assert flat(after[0]) != pytest.approx(flat(before[0]), abs=1e-4)

        # Undo takes back one stroke at a time; an emptied query drops out of the next adaptation
        count = adapt_count(browser)
        second = browser.find_elements(By.CSS_SELECTOR, ".cell.query")[1]
        undo = second.find_element(By.XPATH, ".//button[text()='Undo']")
        undo.click()
        assert second.get_attribute("data-filled") == "true"
        undo.click()
        assert second.get_attribute("data-filled") == "false"
        wait(
            browser,
            ADAPT_SECONDS,
            lambda d: (
                adapt_count(d) > count
                and data(d, "#playground", "state") == "done"
                and len(query_probabilities(d)) == len(queries) - 1
            ),
            "no adaptation without the emptied query",
        )
        assert not second.find_elements(By.XPATH, "..//*[@data-probabilities]")

        # Clear all, then a random task from the test split, then Adapt with another step count
        browser.find_element(By.ID, "clear-all").click()
        assert not browser.find_elements(By.CSS_SELECTOR, ".query-result[data-probabilities]")
        count = adapt_count(browser)
        browser.find_element(By.ID, "random-task").click()
        wait_for_adapt(browser, count)
        assert_distributions(query_probabilities(browser), len(queries), n_way, STEPS)
        verdicts = [v.text for v in browser.find_elements(By.CSS_SELECTOR, ".verdict")]
        assert len(verdicts) == len(queries)
        assert all("correct" in v or "truth: class" in v for v in verdicts), verdicts

        # a busy server (503 + Retry-After) is waited for once, and the page says so
        browser.execute_script(BUSY_ONCE)
        browser.execute_script(
            "const s = document.getElementById('steps'); s.value = 2; s.dispatchEvent(new Event('input'));"
        )
        count = adapt_count(browser)
        browser.find_element(By.ID, "adapt").click()
        wait_for_adapt(browser, count)
        assert browser.execute_script("return window.answeredBusy") is True
        assert any("busy" in text for text in browser.execute_script("return window.statusTexts"))
        assert_distributions(query_probabilities(browser), len(queries), n_way, 2)
        assert browser.find_element(By.ID, "adapt-status").text.startswith("Adapted 2 steps")


def test_playground_without_a_trained_run_says_so(browser, omniglot_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with serve(work, omniglot_dir) as url:
        browser.get(url + "/")
        wait(browser, 30, lambda d: data(d, "#playground", "state") == "no-runs", "no notice")
        notice = browser.find_element(By.ID, "no-runs")
        assert notice.is_displayed()
        assert notice.find_element(By.CSS_SELECTOR, "a[href='/runs']")


# A file dropped on a cell as a person would from a file manager (selenium cannot drag from the
# desktop): a DataTransfer holding the bytes, in a real drop event on the cell's drop zone.
DROP_FILE = """
const [zone, name, type, base64] = arguments;
const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, {type}));
for (const kind of ["dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(kind, {dataTransfer: transfer, bubbles: true, cancelable: true}));
}
"""


def write_uploads(folder: Path, letters: str) -> list[Path]:
    """Two new images of each letter (the support's, then the query's) as files of different
    sizes and formats: a JPEG photo-sized shot, a small PNG."""
    rng = np.random.default_rng(42)
    folder.mkdir()
    files = []
    for shot in range(2):
        for letter in letters:
            image = glyph(letter, rng, size=160)
            if shot == 0:
                path = folder / f"{letter}-support.jpg"
                image.resize((200, 160)).save(path, quality=92)
            else:
                path = folder / f"{letter}-query.png"
                image.resize((64, 64)).save(path)
            files.append(path)
    return files


def preview_sizes(driver, selector: str) -> list[list]:
    """(src prefix, natural width) of each preview image the server sent back."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((i) => "
        "[(i.getAttribute('src') || '').slice(0, 22), i.naturalWidth])",
        selector,
    )


@needs_fonts
def test_playground_adapts_to_uploaded_images(browser, tmp_path):
    """A run on an image folder (84x84 RGB, the MiniImagenet net): files of letters it never saw
    are chosen and dropped into the cells; the server shows what its network sees of each."""
    from metalearn.data import folders
    from metalearn.training.trainer import train

    n_way, size = 5, 84
    images_dir = make_glyph_folder(tmp_path / "images", classes=25, per_class=6, size=size)
    data_dir = tmp_path / "data"
    options = folders.PackOptions(size=size, channels=3, min_per_class=4)
    folders.pack(images_dir, "glyphs", data_dir, options, log=lambda _: None)
    work = tmp_path / "work"
    config = {**TINY, "k_query": 1, "epochs": 6, "run_name": "letters"}
    train({**config, "data": "glyphs", "data_dir": str(data_dir), "work_dir": str(work)})
    unseen = LETTERS[-n_way:]  # letters beyond the 25 of the set: classes new to the run
    files = write_uploads(tmp_path / "uploads", unseen)
    with serve(work, data_dir) as url:
        browser.get(url + "/")
        wait(browser, 30, lambda d: data(d, "#playground", "state") == "ready", "no run to pick")
        assert "glyphs" in browser.find_element(By.ID, "run-info").text
        inputs = browser.find_elements(By.CSS_SELECTOR, ".cell.support input.file")
        assert len(inputs) == n_way and not browser.find_elements(By.CSS_SELECTOR, "canvas.draw")
        for field, path in zip(inputs, files[:n_way]):
            field.send_keys(str(path))
        queries = browser.find_elements(By.CSS_SELECTOR, ".cell.query")
        for cell, path in zip(queries, files[n_way : 2 * n_way - 2]):
            cell.find_element(By.CSS_SELECTOR, "input.file").send_keys(str(path))

        # every support cell filled and a query: it adapts by itself
        wait_for_adapt(browser, 0)
        assert_distributions(query_probabilities(browser), n_way - 2, n_way, STEPS)
        shown = preview_sizes(browser, ".cell.support img.preview")
        assert shown == [["data:image/png;base64,", size]] * n_way  # what the network saw

        # a file dropped on the next query cell joins the task
        count = adapt_count(browser)
        zone = queries[n_way - 2].find_element(By.CSS_SELECTOR, "label.drop")
        payload = base64.b64encode(files[2 * n_way - 2].read_bytes()).decode()
        browser.execute_script(DROP_FILE, zone, "dropped.png", "image/png", payload)
        wait_for_adapt(browser, count)
        probabilities = query_probabilities(browser)
        assert_distributions(probabilities, n_way - 1, n_way, STEPS)
        screenshot(browser, tmp_path, "playground_upload")

        # a file that is not an image is refused in its cell and is not sent
        count = adapt_count(browser)
        text = tmp_path / "notes.txt"
        text.write_text("not an image")
        last = queries[n_way - 1]
        last.find_element(By.CSS_SELECTOR, "input.file").send_keys(str(text))
        assert "not a PNG or JPEG" in last.get_attribute("data-error")
        assert last.get_attribute("data-filled") == "false" and adapt_count(browser) == count

        # a random task from the packed test split, with the true classes
        browser.find_element(By.ID, "random-task").click()
        wait_for_adapt(browser, count)
        assert_distributions(query_probabilities(browser), n_way, n_way, STEPS)
        verdicts = [v.text for v in browser.find_elements(By.CSS_SELECTOR, ".verdict")]
        assert len(verdicts) == n_way
        assert all("correct" in v or "truth: class" in v for v in verdicts), verdicts


# -- runs page and run page --------------------------------------------------------------------------
def set_field(driver, flag: str, value) -> None:
    field = driver.find_element(By.ID, f"flag-{flag}")
    field.clear()
    field.send_keys(str(value))


def statuses(driver, name: str) -> tuple[str | None, set[str]]:
    """The run's row status and its jobs' statuses, read in one go (the page redraws them live)."""
    row, jobs = driver.execute_script(
        """const name = arguments[0];
        const row = [...document.querySelectorAll('#runs-body tr')].find((r) => r.dataset.run === name);
        const jobs = [...document.querySelectorAll('#jobs .job')]
          .filter((j) => j.querySelector('a').textContent === name).map((j) => j.dataset.status);
        return [row ? row.dataset.status : null, jobs];""",
        name,
    )
    return row, set(jobs)


def test_runs_page_trains_live_and_shows_the_curve(browser, omniglot_dir, tmp_path):
    from metalearn.training.trainer import train

    work = tmp_path / "work"
    train(tiny(omniglot_dir, work, run_name="earlier", epochs=3, val_every=1))
    name = "browser-tiny"
    with serve(work, omniglot_dir) as url:
        browser.get(url + "/runs")
        wait(browser, 30, lambda d: d.find_elements(By.ID, "flag-n_way"), "no training form")

        # a refused flag: the message sits next to its field, and nothing starts
        set_field(browser, "n_way", 0)
        browser.find_element(By.ID, "start").click()
        error = wait(
            browser,
            30,
            lambda d: d.find_element(By.ID, "error-n_way").text,
            "no message next to n_way",
        )
        assert "n_way" in error and "0" in error
        field = browser.find_element(By.CSS_SELECTOR, ".field[data-flag='n_way']")
        assert "invalid" in field.get_attribute("class")
        assert browser.find_element(By.ID, "error-k_spt").text == ""

        # a tiny training; the page is never reloaded while it runs
        for flag, value in {
            **tiny(omniglot_dir, work, epochs=4, val_every=2),
            "run_name": name,
        }.items():
            if flag not in ("data_dir", "work_dir"):
                set_field(browser, flag, value)
        assert browser.find_element(By.ID, "error-n_way").text == ""
        browser.execute_script("window.sameDocument = true")
        browser.find_element(By.ID, "start").click()
        seen: set[str] = set()
        jobs_seen: set[str] = set()

        def finished(driver) -> bool:
            status, jobs = statuses(driver, name)
            seen.add(status)
            jobs_seen.update(jobs)
            return status == "complete" and "succeeded" in jobs

        wait(browser, TRAIN_SECONDS, finished, f"{name} did not complete (seen {seen})")
        assert "running" in jobs_seen, jobs_seen
        assert browser.execute_script("return window.sameDocument === true")
        row = browser.find_element(By.CSS_SELECTOR, f"#runs-body tr[data-run='{name}']")
        assert "4/4" in row.text

        # both runs on one chart
        for run in (name, "earlier"):
            browser.find_element(By.CSS_SELECTOR, f"tr[data-run='{run}'] td.check input").click()
        browser.find_element(By.ID, "compare").click()
        wait(
            browser,
            30,
            lambda d: d.find_elements(By.CSS_SELECTOR, "#compare-validation svg[data-series='2']"),
            "no comparison chart of the two runs",
        )
        assert browser.find_element(By.ID, "compare-table").text.count("complete") == 2
        screenshot(browser, tmp_path, "runs")

        # its page: the flags, the loss curve from the log, the validation
        browser.find_element(By.CSS_SELECTOR, f"tr[data-run='{name}'] td.name a").click()
        wait(browser, 30, lambda d: data(d, "#run-page", "state") == "ready", "run page not ready")
        assert data(browser, "#run-page", "status") == "complete"
        with urllib.request.urlopen(f"{url}/api/runs/{name}", timeout=30) as answer:
            logged = len(json.load(answer)["log"])
        loss = browser.find_element(By.CSS_SELECTOR, "#loss-chart svg")
        assert int(loss.get_attribute("data-points")) == logged > 0
        assert loss.find_elements(By.CSS_SELECTOR, "polyline.series")
        assert int(data(browser, "#validation-chart svg", "series")) == TINY["glob_update_step"] + 1
        assert len(browser.find_elements(By.CSS_SELECTOR, "#validation-table tbody tr")) == 2
        assert "--epochs" in browser.find_element(By.ID, "flags").text

        # Evaluate: the test result arrives on the open page
        tasks = browser.find_element(By.ID, "eval-tasks")
        tasks.clear()
        tasks.send_keys("10")
        browser.execute_script("window.sameDocument = true")
        browser.find_element(By.ID, "evaluate").click()
        wait(
            browser,
            TRAIN_SECONDS,
            lambda d: (
                d.find_elements(By.CSS_SELECTOR, "#test-table tbody tr")
                and data(d, "#run-page", "status") == "complete"
                and d.find_element(By.ID, "evaluate").is_enabled()
            ),
            "the evaluation did not show up",
        )
        assert browser.execute_script("return window.sameDocument === true")
        assert int(data(browser, "#test-chart svg", "points")) == TINY["glob_update_step_test"] + 1
        screenshot(browser, tmp_path, "run")

        # Delete asks first (an in-page dialog), then the run is gone from the list
        browser.get(f"{url}/runs/earlier")
        wait(browser, 30, lambda d: d.find_element(By.ID, "delete").is_enabled(), "no Delete")
        browser.find_element(By.ID, "delete").click()
        dialog = browser.find_element(By.ID, "confirm")
        assert dialog.is_displayed() and "earlier" in dialog.text
        browser.find_element(By.ID, "confirm-no").click()
        assert not dialog.is_displayed()
        browser.find_element(By.ID, "delete").click()
        browser.find_element(By.ID, "confirm-yes").click()
        wait(browser, 30, lambda d: d.current_url == f"{url}/runs", "not back on the runs page")
        wait(browser, 30, lambda d: statuses(d, name)[0] == "complete", "the list did not load")
        assert statuses(browser, "earlier")[0] is None


# -- 2D navigation -------------------------------------------------------------------------------
def test_navigation_page_adapts_towards_a_clicked_goal(browser, tmp_path):
    """A click on the plane places the goal; the page shows each step's paths and return."""
    from metalearn.training.trainer import train

    work = tmp_path / "work"
    flags = {"task_num": 2, "k_spt": 4, "horizon": 40, "val_tasks": 2, "epochs": 1}
    train({"dataset": "nav2d", "run_name": "nav", "work_dir": str(work), **flags})
    with serve(work, work) as url:
        browser.get(f"{url}/navigate")
        wait(browser, 30, lambda d: data(d, "#navigate-page", "state") == "ready", "no runs")
        count = browser.find_element(By.ID, "trajectories")
        count.clear()
        count.send_keys("4")
        plane = browser.find_element(By.ID, "plane")
        width = plane.size["width"]  # the plane spans [-0.6, 0.6]: click at (0.3, 0.3)
        ActionChains(browser).move_to_element_with_offset(
            plane, int(0.25 * width), int(-0.25 * width)
        ).click().perform()
        wait(
            browser,
            ADAPT_SECONDS,
            lambda d: (
                data(d, "#navigate-page", "result-count") == "1"
                and data(d, "#navigate-page", "state") == "ready"
            ),
            "the page did not adapt",
        )
        goal = browser.find_element(By.CSS_SELECTOR, "#plane circle.goal")
        assert float(goal.get_attribute("cx")) == pytest.approx(0.3, abs=0.02)
        assert float(goal.get_attribute("cy")) == pytest.approx(-0.3, abs=0.02)  # y is up
        groups = browser.find_elements(By.CSS_SELECTOR, "#plane g.step")
        assert len(groups) == 4  # pre-update and 3 steps (the page's default)
        assert all(len(g.find_elements(By.TAG_NAME, "polyline")) == 4 for g in groups)
        rows = browser.find_elements(By.CSS_SELECTOR, "#returns tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows][:2] == [
            "pre-update",
            "1 step",
        ]
        assert not browser.find_element(By.ID, "page-message").text
        screenshot(browser, tmp_path, "navigation")
