"""Make docs/status-page.png, the README's picture of the status page during `watcher demo`.

    .venv/bin/python docs/status_page_screenshot.py

Runs the real demo (`watcher demo --keep-running`) in a subprocess, waits for its samples,
uploads a scanned 40-page document and a file that is not a document, and photographs
the page in Debian's headless Chromium while the long one is being read.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.docgen import make_tiff

OUT = Path(__file__).with_name("status-page.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def field(lines: list[str], name: str) -> str:
    return next(line.split(None, 2)[-1] for line in lines if line.startswith(name))


def main() -> None:
    port = free_port()
    command = [sys.executable, "-m", "watcher", "demo", "--keep-running", "--http-port", str(port)]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert demo.stdout is not None
    lines: list[str] = []
    try:
        for line in demo.stdout:
            lines.append(line.rstrip("\n"))
            if "keep running" in line:
                break
        endpoint = field(lines, "S3 endpoint")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=field(lines, "region"),
                          aws_access_key_id=field(lines, "access key"),
                          aws_secret_access_key=field(lines, "secret key"))
        pages = [[f"Технический отчёт, страница {i}", "Испытания образцов по ГОСТ 12345"]
                 for i in range(1, 41)]
        s3.put_object(Bucket="documents", Key="input/отчёт об испытаниях.tiff", Body=make_tiff(pages))
        s3.put_object(Bucket="documents", Key="input/readme.txt", Body=b"not a document")
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--window-size=1200,1150"):
            options.add_argument(arg)
        browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            browser.get(f"http://127.0.0.1:{port}/")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                text = browser.find_element(By.ID, "live").text
                if re.search(r"отчёт об испытаниях.tiff\s+(1\d|2\d) / 40", text):
                    break
                time.sleep(0.2)
            OUT.write_bytes(browser.get_screenshot_as_png())
        finally:
            browser.quit()
    finally:
        demo.terminate()
        demo.wait(60)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
