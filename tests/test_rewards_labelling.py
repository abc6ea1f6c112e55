"""The local labelling page: the session logic, the `label` command, and the page in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerestore_cli.data.annotations import Pair, load_annotations, write_pairs
from facerestore_cli.data.labelling import LabelSession, make_server


@pytest.fixture()
def candidates(tmp_path: Path) -> list[Pair]:
    pairs = []
    for i in range(3):
        a, b = tmp_path / "img" / f"{i}_a.png", tmp_path / "img" / f"{i}_b.png"
        a.parent.mkdir(exist_ok=True)
        rng = np.random.default_rng(i)
        cv2.imwrite(str(a), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        cv2.imwrite(str(b), rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        pairs.append(Pair(a, b, None, "auto", "level-vs-alternative", f"face{i}", caption="a face" if i == 1 else ""))
    return pairs


def _expected(session: LabelSession, index: int, choice: str) -> str:
    """What a click on a side means for image a / b, given where the page put a."""
    if choice == "tie":
        return "tie"
    return "a" if (choice == "left") != session.a_on_right(index) else "b"


def test_answers_map_screen_sides_to_images_and_a_restart_resumes(candidates: list[Pair], tmp_path: Path) -> None:
    out = tmp_path / "labels" / "human.jsonl"
    session = LabelSession(candidates, out, annotator="tester", seed=3)
    first = session.state()["pair"]
    side_of_a = "right" if session.a_on_right(first["id"]) else "left"
    assert first[side_of_a].endswith("/a") and {first["left"][-1], first["right"][-1]} == {"a", "b"}
    state = session.record(first["id"], "left")
    with pytest.raises(ValueError, match="no longer the one on screen"):
        session.record(first["id"], "right")
    session.record(state["pair"]["id"], "skip")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["preferred"] == _expected(session, first["id"], "left") and rows[0]["annotator"] == "tester"
    assert rows[0]["shown_left"] == ("b" if session.a_on_right(first["id"]) else "a")
    again = LabelSession(candidates, out, seed=3)
    assert again.labelled == 1 and len(again.queue) == 2, "labelled pairs are not shown again; the skipped one is"
    imported = load_annotations(out)  # the file is valid human-label input for train-frm
    assert not imported.errors and imported.pairs[0].image_a.resolve() == candidates[first["id"]].image_a.resolve()


def test_server_serves_only_the_pairs_images(candidates: list[Pair], tmp_path: Path) -> None:
    session = LabelSession(candidates, tmp_path / "out.jsonl")
    server = make_server(session, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert urllib.request.urlopen(f"{base}/image/0/a").read() == candidates[0].image_a.read_bytes()
        for bad in ("/image/9/a", "/image/0/c", "/image/../../etc/passwd", "/nothing"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + bad)
            assert err.value.code == 404
        req = urllib.request.Request(f"{base}/api/label", data=b'{"id": 0, "choice": "up"}', headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req)
        assert err.value.code == 400 and "choice must be one of" in err.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_label_command_serves_and_stops_cleanly(candidates: list[Pair], tmp_path: Path) -> None:
    write_pairs(tmp_path / "cands.jsonl", candidates)
    out = tmp_path / "human.jsonl"
    cmd = [sys.executable, "-m", "facerestore_cli.cli", "label", str(tmp_path / "cands.jsonl"), "-o", str(out), "--port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        line = proc.stderr.readline()
        assert "labelling 3 of 3 pairs" in line, line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "api/state") as response:  # closed now, not whenever GC runs
            state = json.loads(response.read())
        body = json.dumps({"id": state["pair"]["id"], "choice": "tie"}).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "api/label", data=body, headers={"Content-Type": "application/json"})):
            pass
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"`label` did not stop within 60 s of Ctrl-C; its stderr: {proc.communicate()[1][-2000:]}")
    assert proc.returncode == 0 and "1 of 3 pairs labelled" in rest
    assert json.loads(out.read_text())["preferred"] == "tie"


# ------------------------------------------------------------------ a real browser
def _browser():
    """Headless Chromium through selenium, using installed binaries only (never downloads a driver)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    chromium = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_labelling_page_in_a_headless_browser(candidates: list[Pair], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "human.jsonl"
    session = LabelSession(candidates, out, seed=1)
    server = make_server(session, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait = WebDriverWait(browser, 10)

        def shown_pair() -> tuple[int, str]:
            """Wait until the pair's images are decoded; return its id and the left image's URL."""
            wait.until(
                lambda b: b.execute_script(
                    "return ['left','right'].every(id => {const i = document.getElementById(id); return i.complete && i.naturalWidth > 0;})"
                )
            )
            return int(browser.find_element(By.ID, "pair").get_attribute("data-id")), browser.find_element(By.ID, "left").get_attribute(
                "src"
            )

        def wait_for(labelled: int) -> None:
            wait.until(lambda b: b.find_element(By.ID, "progress").text.startswith(f"{labelled} labelled"))

        first, left_src = shown_pair()
        assert browser.find_element(By.ID, "progress").text == "0 labelled, 0 skipped, 3 to go (of 3)"
        browser.find_element(By.ID, "choose-left").click()
        wait_for(1)
        second, _ = shown_pair()
        assert browser.find_element(By.ID, "caption").text == "caption: a face" and second != first
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
        wait_for(2)
        third, _ = shown_pair()
        browser.find_element(By.TAG_NAME, "body").send_keys("0")
        wait.until(lambda b: b.find_element(By.ID, "done").is_displayed())
        assert not browser.find_element(By.ID, "pair").is_displayed()
    finally:
        browser.quit()
        server.shutdown()
        server.server_close()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    left_image = "a" if left_src.endswith("/a") else "b"
    assert rows[0]["preferred"] == left_image == _expected(session, first, "left"), "the face that was on the left won"
    assert rows[1]["preferred"] == _expected(session, second, "right") and rows[1]["caption"] == "a face"
    assert rows[2]["preferred"] == "tie"
    assert [Path(r["image_a"]).name for r in rows] == [candidates[i].image_a.name for i in (first, second, third)]
