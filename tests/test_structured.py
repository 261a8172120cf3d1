"""VLM output users can trust: the schema from the label map, answers constrained to it, exact field confidences,
calibration, and the HTML report rendered in headless Chromium — on a second data set with another label map."""

import json
import math
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image, ImageDraw

import structured
from conftest import ROOT, run_main, write_json
from metrics import calibration
from structured import field_confidences, label_schema, parse_and_check

DEMO_VLM = str(ROOT / "configs" / "demo_vlm.yaml")
LABEL_MAP = {
    "mapping_type": "positional",
    "positions": [
        {"field": "defect", "map": {"0": "none", "1": "scratch", "2": "dent"}},
        {"field": "severity", "map": {"0": 1, "1": 2, "2": 3}},
    ],
    "defaults": {"inspector": "auto", "reviewed": False},
}


def test_schema_from_the_label_map():
    schema = label_schema(LABEL_MAP)
    assert schema["required"] == ["defect", "severity", "inspector", "reviewed"]
    assert schema["properties"]["defect"] == {"enum": ["none", "scratch", "dent"]}
    assert schema["properties"]["severity"] == {"enum": [1, 2, 3]}
    assert schema["properties"]["reviewed"] == {"type": "boolean"}
    assert schema["properties"]["inspector"] == {"type": "string", "maxLength": 16}
    assert schema["additionalProperties"] is False
    shipped = label_schema(json.loads((ROOT / "data/vlm/label_map.json").read_text()))
    assert shipped["properties"]["is_night_mode"] == {"enum": [False, True]}     # booleans stay booleans
    assert shipped["properties"]["confidence"] == {"type": "number"}
    assert parse_and_check('{"defect": "dent", "severity": 3}', LABEL_MAP) == {"defect": "dent", "severity": 3}
    assert parse_and_check('{"defect": "crack", "severity": 3}', LABEL_MAP) is None


def test_field_confidence_is_the_exact_normalised_probability(models, monkeypatch):
    """Checked against scoring each candidate's whole sequence independently (no shared prefix)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models("qwen3"))
    model = AutoModelForCausalLM.from_pretrained(models("qwen3")).eval()
    inputs = tok(["问题：今天做什么？"], return_tensors="pt")
    answer = '{"defect": "scratch", "severity": 2, "inspector": "auto", "reviewed": false}'
    dists = field_confidences(model, tok, inputs, answer, LABEL_MAP)
    assert set(dists) == {"defect", "severity"}
    monkeypatch.setattr(structured, "_ROWS_PER_PASS", 2)   # 6 candidates in 3 passes, each on a copy of the cache
    for field, dist in field_confidences(model, tok, inputs, answer, LABEL_MAP).items():
        assert dist == pytest.approx(dists[field], rel=1e-5)
    for field, prefix in (("defect", '{"defect": '), ("severity", '{"defect": "scratch", "severity": ')):
        assert sum(dists[field].values()) == pytest.approx(1.0)
        totals = {}
        for value in dists[field]:
            ids = inputs["input_ids"][0].tolist() + tok(prefix + value + ",", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            totals[value] = sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
        norm = math.log(sum(math.exp(v) for v in totals.values()))
        for value, p in dists[field].items():
            assert p == pytest.approx(math.exp(totals[value] - norm), rel=1e-3)


def test_vlm_field_confidence_equals_whole_sequence_scoring_with_the_image(models):
    """The prompt's cache (image included) is shared by all candidates: the result must equal scoring each
    candidate's whole sequence, image and all, on its own."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from data_loading import load_image

    processor = AutoProcessor.from_pretrained(models("qwen3_vl"))
    model = AutoModelForImageTextToText.from_pretrained(models("qwen3_vl")).eval()
    image = load_image(str(sorted((ROOT / "data/vlm/images").iterdir())[0]))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "inspect"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt", images_kwargs={"max_pixels": 16384})
    answer = '{"defect": "dent", "severity": 3, "inspector": "auto", "reviewed": false}'
    vision_calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: vision_calls.append(1))
    dists = field_confidences(model, processor, inputs, answer, LABEL_MAP)
    hook.remove()
    assert len(vision_calls) == 1            # the image went through the vision tower once, for every candidate
    n = inputs["input_ids"].shape[1]
    for field, prefix in (("defect", '{"defect": '), ("severity", '{"defect": "dent", "severity": ')):
        totals = {}
        for value in dists[field]:
            cont = processor.tokenizer(prefix + value + ",", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([inputs["input_ids"][0].tolist() + cont])
            extra = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
                     "mm_token_type_ids": torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(cont)))}
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids, **extra).logits[0].float(), -1)
            totals[value] = sum(float(logp[t - 1, ids[0, t]]) for t in range(n, ids.shape[1]))
        norm = math.log(sum(math.exp(v) for v in totals.values()))
        for value, p in dists[field].items():
            assert p == pytest.approx(math.exp(totals[value] - norm), rel=1e-3)


def test_calibration_values():
    dists = [{'"a"': 0.9, '"b"': 0.1}, {'"a"': 0.9, '"b"': 0.1}, {'"a"': 0.6, '"b"': 0.4}]
    c = calibration(dists, ["a", "b", "a"], ["a", "a", "a"], n_bins=10)
    # bin (0.8, 0.9]: confidence 0.9, accuracy 0.5; bin (0.5, 0.6]: confidence 0.6, accuracy 1.0
    assert c["ece"] == pytest.approx((2 * 0.4 + 1 * 0.4) / 3)
    assert c["brier"] == pytest.approx(((0.1**2 + 0.1**2) + (0.9**2 + 0.9**2) + (0.4**2 + 0.4**2)) / 3)
    assert c["accuracy"] == pytest.approx(2 / 3)


def _second_dataset(root):
    """Another label map: defect x severity, squares whose colour and size follow the code."""
    images = root / "images"
    images.mkdir(parents=True)
    colours = {"0": (200, 200, 200), "1": (200, 60, 60), "2": (60, 60, 200)}
    for code in ("00", "10", "11", "21", "22"):
        for i in range(4):
            img = Image.new("RGB", (64, 64), colours[code[0]])
            d = ImageDraw.Draw(img)
            size = 8 + 10 * int(code[1])
            d.rectangle([32 - size // 2 + i, 32 - size // 2, 32 + size // 2 + i, 32 + size // 2], fill=(20, 20, 20))
            img.save(images / f"{code}_{i}.png")
    write_json(root / "label_map.json", LABEL_MAP)
    (root / "prompt.txt").write_text("Inspect the part and answer with the JSON record.", encoding="utf-8")
    return root


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _render(html_file, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run does it)")
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1600"]
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--user-data-dir={tmp_path / 'u1'}", f"--screenshot={shot}", html_file.as_uri()],
                   capture_output=True, timeout=120)
    dom = subprocess.run(flags + [f"--user-data-dir={tmp_path / 'u2'}", "--dump-dom", html_file.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    return shot, dom


def test_second_label_map_end_to_end_with_report(models, tmp_path):
    data = _second_dataset(tmp_path / "parts")
    args = ["--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"), "--image_dir", data / "images",
            "--label_map_file", data / "label_map.json", "--prompt_file", data / "prompt.txt",
            "--output_dir", tmp_path / "out", "--image_max_pixels", "4096", "--num_train_epochs", "3",
            "--balance", "weighted", "--augmentation", "color"]
    assert run_main("--task", "train", *args) == 0
    assert run_main("--task", "evaluate", *args, "--report_unconstrained", "true") == 0
    run_dir = next((tmp_path / "out").iterdir())
    res = json.loads((run_dir / "eval_results.json").read_text())
    assert res["constrained_decoding"] is True
    assert res["json_valid_rate"] == 1.0 and res["schema_valid_rate"] == 1.0    # valid by construction
    # reported for comparison; a schema-valid answer is valid JSON, so the JSON rate bounds the schema rate
    assert res["json_valid_rate_unconstrained"] >= res["schema_valid_rate_unconstrained"]
    rows = [json.loads(x) for x in (run_dir / "eval_predictions.jsonl").read_text().splitlines()]
    for field in ("defect", "severity"):
        c = res["calibration"][field]
        assert c["n"] == res["num_samples"]
        assert c["accuracy"] == pytest.approx(res["fields"][field]["accuracy"])
        # ECE, a weighted mean of per-bin gaps, is at least the overall gap between accuracy and mean confidence.
        mean_conf = sum(r["field_confidence"][field] for r in rows) / len(rows)
        assert c["ece"] >= abs(c["accuracy"] - mean_conf) - 1e-3
    for r in rows:
        assert r["prediction"]["defect"] in ("none", "scratch", "dent") and r["prediction"]["severity"] in (1, 2, 3)
        assert set(r["field_confidence"]) == {"defect", "severity"}
        assert r["confidence"] == pytest.approx(math.prod(r["field_confidence"].values()), rel=1e-2, abs=1e-4)
    assert (run_dir / "reliability.png").stat().st_size > 5000
    shot, dom = _render(run_dir / "eval_report.html", tmp_path)
    assert shot.stat().st_size > 20000
    # every thumbnail, the reliability plot and the risk-coverage plot of the review thresholds
    assert f'data-images-loaded="{res["num_samples"] + 2}"' in dom
    assert dom.count("<tr") >= res["num_samples"] + 4


def test_base_model_unconstrained_is_invalid_constrained_is_valid(models, tmp_path):
    """An untrained VLM writes no JSON on its own; under the constraint every answer is a valid record."""
    data = _second_dataset(tmp_path / "parts")
    args = ["--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"), "--image_dir", data / "images",
            "--label_map_file", data / "label_map.json", "--prompt_file", data / "prompt.txt",
            "--output_dir", tmp_path / "out", "--image_max_pixels", "4096", "--use_original_model",
            "--report_unconstrained", "true", "--max_new_tokens", "160"]
    assert run_main("--task", "evaluate", *args) == 0
    res = json.loads(next((tmp_path / "out").iterdir()).joinpath("eval_results_original_model.json").read_text())
    assert res["schema_valid_rate"] == 1.0 and res["schema_valid_rate_unconstrained"] < 0.5


def test_llm_report_marks_differences(models, tmp_path):
    data = tmp_path / "d"
    write_json(data / "train.json", [{"text": "问", "target": "答"}])
    write_json(data / "validation.json", [{"text": "问题一", "target": "回答一"},
                                          {"text": "问题二", "target": "回答二"}])
    assert run_main("--task", "evaluate", "--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path",
                    models("qwen3"), "--data_dir", data, "--output_dir", tmp_path / "o", "--use_original_model",
                    "--max_new_tokens", "5") == 0
    html_file = next((tmp_path / "o").iterdir()) / "eval_report_original_model.html"
    text = html_file.read_text(encoding="utf-8")
    assert "问题一" in text and "回答二" in text
    legend_end = text.index("is what differs.</p>") + len("is what differs.</p>")
    rows = text[legend_end:]                  # the legend holds both tags whatever the answers are
    assert re.search(r"<ins>[^<]+</ins>", rows)          # what the (wrong) predictions lack is marked
    shot, dom = _render(html_file, tmp_path)
    assert 'data-rows="' in dom and shot.stat().st_size > 5000
