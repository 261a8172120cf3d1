"""`--task serve` for a VLM run: images as data: URLs, answers constrained to the label map, confidences equal
to evaluate's, refusals of server-side fetches, and the web page in headless Chromium (Playwright)."""

import base64
import contextlib
import json
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, run_main
from serving import Server

DEMO = str(ROOT / "configs" / "demo_vlm.yaml")
IMAGES = ROOT / "data" / "vlm" / "images"
LABELS = json.loads((ROOT / "data/vlm/label_map.json").read_text())
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def data_url(path: Path) -> str:
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower().lstrip(".")
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, text: str | None = None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_vlm")
    args = ["--config", DEMO, "--model_name_or_path", tmp / "tiny-qwen3-vl", "--output_dir", tmp / "out",
            "--image_dir", IMAGES, "--num_train_epochs", "4", "--save_strategy", "no"]
    assert run_main("--task", "train", *args) == 0
    assert run_main("--task", "evaluate", *args) == 0
    rows = [json.loads(x) for x in (tmp / "out/tiny-qwen3-vl/eval_predictions.jsonl").read_text().splitlines()]
    server = Server(args, tmp / "server.log")
    yield server, rows, tmp
    server.stop()


def test_answers_and_confidences_equal_evaluate(vlm):
    server, rows, _ = vlm
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3-vl", "tiny-qwen3-vl-base"]
    allowed = {p["field"]: list(p["map"].values()) for p in LABELS["positions"]}
    for row in rows:
        messages = image_message(data_url(Path(row["file"])))
        reply = client.chat.completions.create(model="tiny-qwen3-vl", messages=messages)
        choice = reply.choices[0]
        answer = json.loads(choice.message.content)
        assert {**answer, "confidence": None} == {**json.loads(row["raw"]), "confidence": None}   # same answer
        assert answer == row["prediction"] and answer["confidence"] == round(row["confidence"], 4)
        assert all(answer[f] in values for f, values in allowed.items())
        extra = choice.model_extra
        assert set(extra["field_confidence"]) == set(allowed)
        assert extra["field_confidence"] == pytest.approx(row["field_confidence"], abs=2e-4)
        assert extra["confidence"] == pytest.approx(row["confidence"], abs=2e-4)


def test_stream_and_base_model(vlm):
    server, rows, _ = vlm
    client = server.client()
    url = data_url(Path(rows[0]["file"]))
    chunks = list(client.chat.completions.create(model="tiny-qwen3-vl", messages=image_message(url), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == rows[0]["prediction"]
    assert chunks[-1].choices[0].model_extra["field_confidence"] == pytest.approx(rows[0]["field_confidence"],
                                                                                  abs=2e-4)
    base = client.chat.completions.create(model="tiny-qwen3-vl-base", messages=image_message(url), max_tokens=64)
    content = base.choices[0].message.content          # the untrained base model is held to the schema too
    assert content.startswith('{"status": "') and content.split('"')[3] in ("No Leakage", "Leakage")
    assert content != text


@pytest.mark.parametrize("url,fragment", [
    ("https://example.com/a.jpg", "only data: URLs"),
    (str(IMAGES / "000_20260103_000.jpg"), "only data: URLs"),
    ("file:///etc/passwd", "only data: URLs"),
    ("data:text/plain;base64,aGVsbG8=", "data:image/"),
    ("data:image/png;base64,aGVsbG8=", "not a readable image"),
    ("data:image/png;base64,***", "does not decode"),
])
def test_refused_images(vlm, url, fragment):
    server, _, _ = vlm
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny-qwen3-vl", "messages": image_message(url)})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny-qwen3-vl", "messages": [{"role": "user", "content": "what is it?"}]})
    assert r.status_code == 400 and "answers images" in r.json()["error"]["message"]


def test_image_folder_allows_paths_inside_it_only(tmp_path):
    from openai_api import ApiError, parse_request, to_example

    folder = tmp_path / "allowed"
    folder.mkdir()
    shutil.copy(IMAGES / "000_20260103_000.jpg", folder / "a.jpg")
    (tmp_path / "outside.jpg").write_bytes((IMAGES / "000_20260103_000.jpg").read_bytes())
    for url in ("a.jpg", f"file://{folder / 'a.jpg'}"):
        example, images = to_example(parse_request({"messages": image_message(url)}), True, None, folder)
        assert images[0].size == (96, 96) and example.image is not None
    for url in ("../outside.jpg", str(tmp_path / "outside.jpg"), "http://127.0.0.1/a.jpg"):
        with pytest.raises(ApiError):
            to_example(parse_request({"messages": image_message(url)}), True, None, folder)


def _browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    return sync_playwright(), exe


@contextlib.contextmanager
def browser_page(url: str):
    """A page of headless Chromium at `url` (skips where Chromium is not installed)."""
    pw, exe = _browser()
    with pw as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(url)
        yield page
        browser.close()


def test_web_page_uploads_an_image_and_shows_bars(vlm, tmp_path):
    server, rows, _ = vlm
    with browser_page(server.url + "/") as page:
        page.wait_for_selector("#inspect:not([hidden])")
        page.set_input_files("#image", rows[0]["file"])
        page.wait_for_selector(".bar-row", timeout=60_000)
        assert json.loads(page.inner_text("#answer")) == rows[0]["prediction"]
        assert page.inner_text("#overall").startswith("overall confidence")
        assert page.locator(".bar-row").count() == 3
        assert page.get_attribute('.bar-row[data-field="status"] .bar > span', "style").startswith("width:")
        page.screenshot(path=str(tmp_path / "vlm_page.png"))
        note = tmp_path / "notes.txt"
        note.write_text("not an image", encoding="utf-8")
        page.set_input_files("#image", str(note))
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        assert "data:image/" in page.inner_text("#error")
