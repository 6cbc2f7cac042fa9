"""Write the README's screenshot of the web demo, ``docs/images/app.png``.

    python scripts/make_app_screenshot.py [--pipeline DIR] [--output docs/images/app.png]

Serves ``stn-diffusers app``'s page on a free localhost port, opens it in Debian's headless Chromium
(``apt-get install chromium chromium-driver``), loads the first example (the astronaut moved by a
known warp), presses Align and saves the whole page once the result is shown, as a 256-colour PNG
(a screenshot of flat colours and two photos: a palette keeps it small and sharp).
"""

from __future__ import annotations

import argparse
import io
import socket
import tempfile
from pathlib import Path

import PIL.Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from stn_diffusers import app
from stn_diffusers.cli import load_pipeline

WIDTH = 1280
TIMEOUT = 120  # seconds for the page, and for one alignment on a small CPU
COLOURS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None, help="saved pipeline folder (default: the embedded one)")
    parser.add_argument("--output", default="docs/images/app.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    demo = app.build_app(load_pipeline(args.pipeline))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WIDTH},1000")
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
        try:
            screenshot = _screenshot_after_alignment(driver, f"http://127.0.0.1:{port}/")
        finally:
            driver.quit()
            demo.close()
    picture = PIL.Image.open(io.BytesIO(screenshot)).convert("RGB").quantize(COLOURS, dither=PIL.Image.Dither.NONE)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.output, optimize=True)
    print(f"wrote {args.output} ({picture.width}×{picture.height}, {Path(args.output).stat().st_size // 1024} KB)")


def _screenshot_after_alignment(driver, url: str) -> bytes:
    wait = WebDriverWait(driver, TIMEOUT)
    driver.get(url)
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#examples button"))[0].click()
    wait.until(
        lambda page: all(
            page.find_elements(By.CSS_SELECTOR, f"#{box} img") for box in ("moving-image", "reference-image")
        )
    )
    driver.find_element(By.CSS_SELECTOR, "#align-button").click()
    wait.until(lambda page: "θ (2×3" in page.find_element(By.CSS_SELECTOR, "#alignment-report").text)
    wait.until(
        lambda page: page.execute_script(
            "return [...document.querySelectorAll('#aligned-image img, #valid-mask img')]"
            ".filter(image => image.complete && image.naturalWidth > 0).length === 2"
        )
    )
    # The whole page in one picture: a viewport as tall as the document.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return driver.get_screenshot_as_png()


if __name__ == "__main__":
    main()
