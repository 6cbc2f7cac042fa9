"""`stn-diffusers app`: the alignment behind the page, its input errors, the command, and the page
itself in a headless Chromium (Debian's `chromium` and `chromium-driver`).

The browser test skips when Chromium or its driver is absent, unless ``STN_REQUIRE_BROWSER=1`` (CI),
where it fails instead: a CI machine without a working browser must not pass silently.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from stn_diffusers import app, cli, geometry, load_default
from stn_diffusers.data import ASSETS, REAL_PAIR
from stn_diffusers.images import load_image

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Offline and quiet: no first-run pages, no background updates or sync, nothing over QUIC.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1400",
)
# Seconds the page may take to load, and an alignment (both images encoded on a shared 2-core CPU).
PAGE_TIMEOUT = 60
ALIGN_TIMEOUT = 120


@pytest.fixture(scope="module")
def pipeline():
    return load_default()


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return app.example_pairs(tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module")
def moved_example(pipeline, examples) -> app.AppAlignment:
    """The first example (the astronaut moved by a known warp) aligned as the page aligns it."""
    _, moving_path, reference_path = examples[0]
    return app.align_for_app(pipeline, load_image(moving_path), load_image(reference_path))


def example_theta() -> torch.Tensor:
    """The θ that aligns the first example back, written out from its documented motion (a square
    image: rotation and zoom are the same in normalised and pixel units)."""
    angle = math.radians(app.EXAMPLE_ROTATION_DEGREES)
    a, b = app.EXAMPLE_SCALE * math.cos(angle), app.EXAMPLE_SCALE * math.sin(angle)
    return torch.tensor([[[a, -b, app.EXAMPLE_SHIFT[0]], [b, a, app.EXAMPLE_SHIFT[1]]]])


# ------------------------------------------------------------------------------------- alignment
class TestAlignForApp:
    def test_recovers_the_known_warp_of_the_moved_example(self, moved_example):
        result = moved_example
        size = app.EXAMPLE_SIZE
        assert result.aligned.size == (size, size)  # example_theta is written for a square
        error = float(geometry.corner_error(result.theta, example_theta(), size, size)[0])
        assert error < 2.0, error
        assert result.confidence >= app.DEFAULT_CONFIDENCE_THRESHOLD
        assert not result.unwarped and result.refined is None
        assert result.mean_difference_after < result.mean_difference_before / 4
        # The pixel matrix is the same motion in the moving image's pixels.
        expected_pixels = geometry.theta_to_pixel_matrix(example_theta().double(), size, size)[0]
        assert torch.allclose(result.pixel_matrix, expected_pixels, atol=2.0)

    def test_valid_mask_marks_the_exposed_border_of_the_aligned_image(self, moved_example):
        result = moved_example
        size = app.EXAMPLE_SIZE
        assert result.aligned.size == result.valid_mask.size == (size, size)
        mask = torch.from_numpy(np.array(result.valid_mask))  # (size, size) uint8
        assert set(mask.unique().tolist()) == {0, 255}
        assert mask[size // 2, size // 2] == 255  # the centre comes from inside the moving image
        # Where the mask is black, the aligned image is the warp's zero padding.
        aligned = torch.from_numpy(np.array(result.aligned.convert("L")))
        assert aligned[mask == 0].float().mean() < 8
        assert 0.5 < float((mask == 255).float().mean()) < 1.0

    def test_report_shows_theta_pixel_matrix_and_confidence(self, pipeline):
        reference, moving = (load_image(ASSETS / name) for name in REAL_PAIR)
        result = app.align_for_app(pipeline, moving, reference)
        report = app.format_report(result)
        assert "θ (2×3, normalised coordinates)" in report
        assert f"Pixel matrix (2×3, {moving.width}×{moving.height} pixels)" in report
        assert f"{result.confidence:.3f} (threshold {app.DEFAULT_CONFIDENCE_THRESHOLD}" in report
        assert f"{float(result.theta[0, 0, 2]):+.6f}" in report
        # Comparisons are in the reference's frame (its aspect), whatever the moving image's size.
        assert result.blend_after.size == result.difference_after.size
        width, height = result.blend_after.size
        assert max(width, height) == min(app.DISPLAY_SIDE, max(reference.size))
        assert abs(width / height - reference.width / reference.height) < 0.01


class TestInputErrors:
    def test_missing_reference_is_named(self, pipeline, astronaut):
        with pytest.raises(ValueError, match="expected a reference image to align, got none"):
            app.align_for_app(pipeline, astronaut, None)
        with pytest.raises(ValueError, match="a moving image and a reference image"):
            app.align_for_app(pipeline, None, None)

    def test_mask_of_another_size_than_the_reference_is_refused(self, pipeline, astronaut):
        mask = PIL.Image.new("L", (256, 256))
        with pytest.raises(ValueError, match="reference's size, 512×512 .* got 256×256"):
            app.align_for_app(pipeline, astronaut, astronaut, mask)

    def test_page_shows_input_mistakes_as_gradio_errors(self, pipeline, astronaut, tmp_path):
        gr = pytest.importorskip("gradio")
        with pytest.raises(gr.Error, match="expected a reference image"):
            app.on_align(pipeline, tmp_path, astronaut, None, None, False)
        # The pipeline's own checks reach the page the same way.
        everything = PIL.Image.new("L", astronaut.size, 255)
        with pytest.raises(gr.Error, match="leave some pixels"):
            app.on_align(pipeline, tmp_path, astronaut, astronaut, everything, False)

    def test_page_offers_the_aligned_image_and_mask_as_png(self, pipeline, examples, tmp_path):
        _, moving_path, reference_path = examples[0]
        outputs = app.on_align(pipeline, tmp_path, load_image(moving_path), load_image(reference_path), None, False)
        download_aligned, download_mask = outputs[-2:]
        for button, mode in ((download_aligned, "RGB"), (download_mask, "L")):
            assert button.interactive
            with PIL.Image.open(button.value["path"]) as picture:
                assert (picture.format, picture.mode, picture.size) == ("PNG", mode, (app.EXAMPLE_SIZE,) * 2)

    def test_only_the_latest_alignments_stay_on_disk(self, pipeline, examples, tmp_path):
        _, moving_path, reference_path = examples[0]
        moving, reference = load_image(moving_path), load_image(reference_path)
        for count in range(1, app.KEPT_ALIGNMENTS + 3):
            served = app.on_align(pipeline, tmp_path, moving, reference, None, False)[-2].value["path"]
            folders = sorted(tmp_path.glob("alignment-*"))
            assert len(folders) == min(count, app.KEPT_ALIGNMENTS)
            assert {path.name for path in folders[-1].iterdir()} == {app.ALIGNED_FILE, app.VALID_MASK_FILE}
            assert Path(served).is_file()  # what the page serves outlives the folder it came from


# --------------------------------------------------------------------------------------- command
def test_cli_help_and_import_leave_gradio_unloaded():
    code = (
        "import sys\n"
        "from stn_diffusers import cli\n"
        "try:\n"
        "    cli.main(['app', '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "assert 'gradio' not in sys.modules, 'gradio imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--pipeline", "--host", "--port", "--share", "--refine"):
        assert flag in done.stdout


def test_app_defaults_to_this_machine_without_a_share_link():
    args = cli.build_parser().parse_args(["app"])
    assert (args.host, args.port, args.share, args.pipeline, args.refine) == ("127.0.0.1", None, False, None, None)
    assert args.func is app.run_app


def test_missing_gradio_names_the_extra(monkeypatch, pipeline):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "stn-diffusers\[app\]"'):
        app.build_app(pipeline)


# --------------------------------------------------------------------------------------- browser
def _browser_or_skip() -> tuple[str, str]:
    """Chromium and its driver, or a skip naming what is missing (a failure with STN_REQUIRE_BROWSER=1)."""
    found = {path: shutil.which(path) for path in (CHROMIUM, CHROMEDRIVER)}
    missing = [path for path, where in found.items() if where is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("STN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"STN_REQUIRE_BROWSER=1: {reason}")
        pytest.skip(reason)
    return found[CHROMIUM], found[CHROMEDRIVER]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served_page(pipeline):
    demo = app.build_app(pipeline)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.mark.browser
def test_page_aligns_two_uploaded_photos(browser, served_page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served_page)
    WebDriverWait(browser, PAGE_TIMEOUT).until(
        lambda page: page.find_elements(By.CSS_SELECTOR, "#reference-image input[type=file]")
    )
    reference, moving = REAL_PAIR
    browser.find_element(By.CSS_SELECTOR, "#moving-image input[type=file]").send_keys(str(ASSETS / moving))
    browser.find_element(By.CSS_SELECTOR, "#reference-image input[type=file]").send_keys(str(ASSETS / reference))
    WebDriverWait(browser, PAGE_TIMEOUT).until(
        lambda page: all(
            page.find_elements(By.CSS_SELECTOR, f"#{box} img") for box in ("moving-image", "reference-image")
        )
    )
    browser.find_element(By.CSS_SELECTOR, "#align-button").click()

    def report_text(page):
        text = page.find_element(By.CSS_SELECTOR, "#alignment-report").text
        return text if "θ (2×3" in text else None

    report = WebDriverWait(browser, ALIGN_TIMEOUT).until(report_text)
    assert "Confidence:" in report and "Pixel matrix (2×3, 641×555 pixels)" in report

    # The aligned image is rendered at the moving image's size, and both downloads are ready.
    def rendered_width(page):
        images = page.find_elements(By.CSS_SELECTOR, "#aligned-image img")
        return images and page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0])

    with PIL.Image.open(ASSETS / moving) as photo:
        assert WebDriverWait(browser, PAGE_TIMEOUT).until(rendered_width) == photo.width
    buttons = [button for button in browser.find_elements(By.TAG_NAME, "button") if "Download the" in button.text]
    assert len(buttons) == 2 and all(button.is_enabled() for button in buttons)
