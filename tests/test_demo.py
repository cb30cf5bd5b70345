"""`python -m maskgit_jax.demo` as a user runs it, driven in a real headless Chromium.

The checkpoint is the embedded default's architecture (configs/digits.py) at 16x16 pixels in 4x4
tokens of 4 pixels, so that a painted token and its margin are a visible region, with random
weights, written by `save_pretrained` in seconds:
the page's plumbing is what is tested, not the samples' quality. The browser tests skip where
Debian's chromium and chromium-driver are not installed (`.ci/run` installs them).
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.helpers import load_config_file, save_random_pretrained

# Seconds the demo may take to start serving, and a request to come back.
START_S = 240
REQUEST_S = 180
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium and chromium-driver are not installed "
    "(apt-get install -y chromium chromium-driver)",
)


def _demo_env(tmp_path) -> dict:
    """One CPU device (not conftest's 8 fake ones), no analytics, Gradio's cache in tmp_path."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    return env


def _demo_command(checkpoint, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "maskgit_jax.demo",
        f"--checkpoint={checkpoint}",
        f"--port={port}",
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pretrained directory of the digits config at 16 px in 4-pixel tokens, random weights."""
    config = load_config_file("configs/digits.py")
    config.image_size = 16
    config.tokenizer.channel_multipliers = (1, 2, 2)
    return save_random_pretrained(tmp_path_factory.mktemp("demo") / "pretrained", config)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The demo served on a free port, started as a user starts it; its URL."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    log = open(root / "demo.log", "w")  # noqa: SIM115  Closed at teardown.
    process = subprocess.Popen(
        _demo_command(checkpoint, port),
        cwd=REPO_ROOT,
        env=_demo_env(root),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo exited with {process.returncode}:\n{_tail(root)}")
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not serve {url} within {START_S} s:\n{_tail(root)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _tail(root) -> str:
    return (root / "demo.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
    ):
        options.add_argument(argument)
    # An explicit driver: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server):
    """The page freshly loaded, once its components are on it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    WebDriverWait(browser, 60).until(
        expected_conditions.element_to_be_clickable((By.ID, "generate"))
    )
    return browser


def _open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    tabs = [t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name]
    assert tabs, f"no tab {name!r}"
    tabs[0].click()
    time.sleep(1)  # The tab's components mount, as a person waits to see them.


def _result(driver, elem_id: str) -> np.ndarray:
    """The image an output component shows, read from the server as the browser reads it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def source(d):
        errors = [t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")]
        assert not errors, f"the page reported: {errors}"
        images = d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
        src = images[0].get_attribute("src") if images else None
        return src if src and "/file=" in src else False

    src = WebDriverWait(driver, REQUEST_S, poll_frequency=0.5).until(source)
    with urllib.request.urlopen(src, timeout=30) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def _toast(driver) -> str:
    """The text of the page's error messages, once one is shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(d):
        toasts = d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
        return " ".join(t.text for t in toasts) if toasts else False

    return WebDriverWait(driver, REQUEST_S, poll_frequency=0.5).until(text)


def _upload(driver, elem_id: str, path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))


def _digit_png(path) -> np.ndarray:
    """A digit of the embedded dataset, 16x16 RGB uint8, written as PNG."""
    from sklearn.datasets import load_digits

    digit = load_digits().images[7] / 16.0
    image = np.round(np.kron(digit, np.ones((2, 2))) * 255).astype(np.uint8)
    image = np.stack([image, 255 - image, image // 2], axis=-1)
    Image.fromarray(image).save(path)
    return image


@needs_browser
def test_generate_shows_images(page):
    from selenium.webdriver.common.by import By

    classes = page.find_element(By.CSS_SELECTOR, "#classes textarea, #classes input")
    classes.clear()
    classes.send_keys("3, 7")
    page.find_element(By.ID, "generate").click()
    grid = _result(page, "generated")
    # Two rows (classes 3 and 7) of two enlarged 16x16 samples, with labels and gaps.
    assert grid.ndim == 3 and grid.shape[0] >= 2 * 32 and grid.shape[1] >= 2 * 32
    assert grid.std() > 0


@needs_browser
def test_inpaint_keeps_the_unmasked_area(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    upload = _digit_png(tmp_path / "digit.png")
    _open_tab(page, "Inpaint")
    _upload(page, "inpaint_input", tmp_path / "digit.png")

    readings = []

    def fitted_zoom(d):
        """The editor's zoom once it has fitted the 16-pixel upload to its canvas and settled.

        A starved browser shows the zoom mid-animation; a stroke placed at that scale lands
        elsewhere, so the value must read the same on two polls in a row.
        """
        shown = d.find_elements(By.CSS_SELECTOR, "#inpaint_input .zoom-number span")
        text = shown[0].text if shown else ""
        readings.append(text)
        settled = len(readings) >= 2 and readings[-2] == text
        fitted = text.endswith("%") and text != "100%"
        return settled and fitted and float(text.rstrip("%")) / 100

    scale = WebDriverWait(page, 30, poll_frequency=0.3).until(fitted_zoom)
    canvas = page.find_element(By.CSS_SELECTOR, "#inpaint_input .pixi-target canvas")

    def offset(x: float, y: float) -> tuple[int, int]:
        """Screen offset from the canvas centre (the image's centre) of image pixel (x, y)."""
        return round((x + 0.5 - 8) * scale), round((y + 0.5 - 8) * scale)

    # A stroke inside token (0, 0), pixels [0:4, 0:4] (the brush is 1 pixel wide).
    start, end = offset(1, 1), offset(2, 2)
    ActionChains(page).move_to_element_with_offset(canvas, *start).click_and_hold().move_by_offset(
        end[0] - start[0], end[1] - start[1]
    ).release().perform()
    time.sleep(1)  # As a person would: the editor hands its layers over when the stroke ends.
    page.find_element(By.ID, "inpaint").click()
    result = _result(page, "inpainted")
    assert result.shape == upload.shape
    # Redrawn: token (0, 0) plus one token of margin, pixels [0:8, 0:8] (no blur at 16 px).
    # Everywhere else the returned pixels are the upload's.
    changed = np.any(result != upload, axis=-1)
    redrawn = np.zeros((16, 16), bool)
    redrawn[:8, :8] = True
    assert not changed[~redrawn].any(), changed.astype(int)
    assert changed[redrawn].any(), "nothing was redrawn"


@needs_browser
@pytest.mark.parametrize(
    "tab, elem_id, button, image, message",
    [
        ("Inpaint", "inpaint_input", "inpaint", np.zeros((13, 15, 3)), "multiples of the"),
        ("Outpaint", "outpaint_input", "outpaint", np.zeros((16, 16, 4)), "transparent pixels"),
    ],
)
def test_bad_upload_gets_a_readable_message(page, tmp_path, tab, elem_id, button, image, message):
    from selenium.webdriver.common.by import By

    path = tmp_path / "bad.png"
    Image.fromarray(image.astype(np.uint8)).save(path)
    _open_tab(page, tab)
    _upload(page, elem_id, path)
    time.sleep(1)
    page.find_element(By.ID, button).click()
    assert message in _toast(page)


@pytest.mark.parametrize("problem", ["missing", "mismatched"])
def test_cli_refuses_a_bad_checkpoint_before_serving(checkpoint, tmp_path, problem):
    if problem == "missing":
        directory, expected = tmp_path / "nowhere", "nowhere"
    else:
        directory = tmp_path / "mismatched"
        shutil.copytree(checkpoint, directory)
        config = json.loads((directory / "config.json").read_text())
        config["transformer"]["hidden_size"] = 64
        (directory / "config.json").write_text(json.dumps(config))
        expected = "transformer"
    done = subprocess.run(
        _demo_command(directory, _free_port()),
        cwd=REPO_ROOT,
        env=_demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=START_S,
    )
    assert done.returncode != 0
    assert f"cannot load --checkpoint={directory}" in done.stderr, done.stderr[-3000:]
    assert expected in done.stderr.split("cannot load", 1)[1]
    assert "Running on" not in done.stdout + done.stderr
