"""Screenshot of the web page answering one photo: start ``visearch-serve --http-port 0``
on an index root, open the page in headless Chromium, upload the photo (optionally with a
product box), wait for the answer and save the whole page as a PNG.

    python scripts/screenshot_web.py --index-root R --image PHOTO --out shot.png
        [--box X1,Y1,X2,Y2] [--width 1280] [--chromium PATH] [--chromedriver PATH]
        [-- more visearch-serve flags, e.g. --no-detector]

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``);
Selenium is given the driver's path and never downloads one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from benchmarks.latency import spawn_server


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index-root", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True, help="the photo to upload")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--box", help="product box X1,Y1,X2,Y2 in the photo's pixels (drawn "
                                 "with the mouse, as a person would)")
    p.add_argument("--width", type=int, default=1280, help="window width, pixels")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for answers")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--chromedriver",
                   default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    p.add_argument("serve_flags", nargs="*", help="more visearch-serve flags (after --)")
    return p


def _state(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") or ""


def _draw_box(driver, box: list[float]) -> None:
    """Drag the box on the photo's canvas with the mouse (image pixels -> CSS pixels)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "photo")
    # photo pixels -> canvas pixels (the page enlarges small photos) -> CSS pixels
    scale = (driver.execute_script("return state.scale") * canvas.size["width"]
             / float(canvas.get_attribute("width")))
    # Selenium's offsets are from the element's centre.
    cx, cy = canvas.size["width"] / 2, canvas.size["height"] / 2
    x1, y1, x2, y2 = (v * scale for v in box)
    (ActionChains(driver).move_to_element_with_offset(canvas, int(x1 - cx), int(y1 - cy))
     .click_and_hold().move_by_offset(int(x2 - x1), int(y2 - y1)).release().perform())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name, path in (("--chromium", args.chromium), ("--chromedriver", args.chromedriver)):
        if not os.access(path, os.X_OK):
            print(f"screenshot_web: no {name} at {path}: install chromium and "
                  "chromium-driver, or name them", file=sys.stderr)
            return 2
    box = [float(v) for v in args.box.split(",")] if args.box else None
    if box is not None and len(box) != 4:
        print("screenshot_web: --box takes X1,Y1,X2,Y2", file=sys.stderr)
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")
    proc, _ = spawn_server(args.index_root, "--http-port", "0", *args.serve_flags)
    driver = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "web page at " not in line:
            print(f"screenshot_web: the server shows no web page: {line!r}", file=sys.stderr)
            return 1
        url = line.split("web page at ", 1)[1].strip()
        options = webdriver.ChromeOptions()
        options.binary_location = args.chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", f"--window-size={args.width},1000"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, args.timeout)
        driver.find_element(By.ID, "file").send_keys(str(args.image.resolve()))
        wait.until(lambda d: _state(d) in ("done", "error"))
        if box is not None and _state(driver) == "done":
            driver.execute_script("document.body.dataset.state = 'boxing'")
            _draw_box(driver, box)
            wait.until(lambda d: _state(d) in ("done", "error"))
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete)"))
        height = driver.execute_script("return document.documentElement.scrollHeight")
        # The whole page, not the window: headless windows are clamped to a screen size.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": args.width, "height": max(600, int(height)), "deviceScaleFactor": 1,
            "mobile": False})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        state = _state(driver)
        message = driver.find_element(By.ID, "error").text if state == "error" else ""
        print(f"screenshot_web: wrote {args.out} ({state}{': ' + message if message else ''})")
        return 0 if state == "done" else 1
    finally:
        if driver is not None:
            driver.quit()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
