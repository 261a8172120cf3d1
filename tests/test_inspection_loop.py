"""The inspection loop on tiny Qwen3-VL runs: thresholds from evaluate, needs_review on every answer, the review
queue of a served run (API with the official `openai` client, review routes with httpx, the page's review tab in
headless Chromium), retraining from the corrections with init_adapter, the server reloading the new adapter, and
two runs of one base model on one server. The README's "inspection loop" section runs here as subprocesses."""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, run_cli, run_main
from serving import Server

SHAPES = str(ROOT / "configs" / "demo_vlm_shapes.yaml")
LEAK = str(ROOT / "configs" / "demo_vlm.yaml")
INCOMING = ROOT / "data" / "vlm_shapes" / "incoming"


def _url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _ask(client, model: str, path: Path):
    reply = client.chat.completions.create(model=model, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(path)}}]}])
    return reply.choices[0]


def _truth(path: Path, label_map: dict) -> dict:
    from data_loading import decode_code, label_code

    return decode_code(label_code(path), label_map)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The pixel demo trained and evaluated as the README's inspection loop section says, as subprocesses."""
    tmp = tmp_path_factory.mktemp("loop")
    args = ["--config", SHAPES, "--model_name_or_path", tmp / "tiny-qwen3-vl-shapes", "--output_dir", tmp / "out"]
    for task in ("train", "evaluate"):
        proc = run_cli("--task", task, *args, timeout=900)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    run = tmp / "out" / "tiny-qwen3-vl-shapes"
    label_map = json.loads((run / "lora_model" / "label_map.json").read_text(encoding="utf-8"))
    return {"tmp": tmp, "args": args, "run": run, "label_map": label_map,
            "evaluate_log": proc.stderr.decode(errors="replace")}


# ----------------------------------------------------------------------------------------------------
# 1. thresholds: by construction, and against a brute-force recomputation from evaluate's predictions
def _brute(confidences, correct, target):
    """Every candidate threshold tried on its own: the lowest whose accepted answers reach the target."""
    best = None
    for t in sorted({c for c in confidences if c is not None}):
        accepted = [ok for c, ok in zip(confidences, correct) if c is not None and c >= t]
        if accepted and sum(accepted) / len(accepted) >= target:
            best = (t, len(accepted) / len(confidences), sum(accepted) / len(accepted))
            break
    return best


def test_thresholds_match_a_brute_force_recomputation():
    import thresholds

    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 40)
        conf = [None if rng.random() < 0.05 else round(rng.choice([rng.random(), 0.5, 0.9]), 2) for _ in range(n)]
        ok = [rng.random() < (c or 0.3) for c in conf]
        target = rng.choice([0.5, 0.8, 0.9, 0.99, 1.0])
        got = thresholds.choose(thresholds.curve(conf, ok), n, target)
        want = _brute(conf, ok, target)
        if want is None:
            assert not got["reached"] and got["coverage"] == 0 and got["threshold"] is None, trial
        else:
            assert (got["threshold"], got["coverage"], got["accuracy"]) == pytest.approx(want), trial
            assert got["accuracy"] >= target


def test_evaluate_writes_thresholds_that_reach_the_target_on_validation(shapes):
    import thresholds

    run, label_map = shapes["run"], shapes["label_map"]
    th = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))
    rows = _rows(run / "eval_predictions.jsonl")
    fields = [p["field"] for p in label_map["positions"]]
    assert th["target_accuracy"] == 0.99 and th["num_samples"] == len(rows) == 30
    assert th["adapter_revision"] and set(th["fields"]) == set(fields)
    for name in [*fields, "confidence"]:
        t = th["fields"][name] if name != "confidence" else th["confidence"]
        if name == "confidence":
            conf = [r["confidence"] for r in rows]
            ok = [all(r["prediction"][f] == r["target"][f] for f in fields) for r in rows]
        else:
            conf = [r["field_confidence"][name] for r in rows]
            ok = [r["prediction"][name] == r["target"][name] for r in rows]
        want = _brute(conf, ok, 0.99)
        if want is None:
            assert t["threshold"] is None and t["coverage"] == 0
            continue
        assert (t["threshold"], t["coverage"], t["accuracy"]) == pytest.approx(want)
        accepted = [o for c, o in zip(conf, ok) if c >= t["threshold"]]
        assert sum(accepted) / len(accepted) >= 0.99 and t["accepted"] == len(accepted)
    # The colour is read from a global cue: every validation answer is right and accepted.
    assert th["fields"]["colour"]["coverage"] == 1.0
    # needs_review in evaluate's predictions is exactly what the thresholds say
    for r in rows:
        assert {k: r[k] for k in ("needs_review", "review_fields")} == \
            thresholds.flags(r["field_confidence"], r["confidence"], th)
    assert any(r["needs_review"] for r in rows)
    results = json.loads((run / "eval_results.json").read_text(encoding="utf-8"))
    assert results["review_rate"] == pytest.approx(sum(r["needs_review"] for r in rows) / len(rows))
    report = (run / "eval_report.html").read_text(encoding="utf-8")
    assert "Review thresholds" in report and "risk_coverage.png" in report
    assert (run / "risk_coverage.png").stat().st_size > 1000
    assert "review thresholds for accuracy 0.99 on 30 validation samples" in shapes["evaluate_log"]


def test_batch_inference_rows_say_whether_they_need_review(shapes, tmp_path):
    import thresholds

    out = tmp_path / "preds.jsonl"
    assert run_main("--task", "inference", *shapes["args"], "--input", INCOMING, "--output", out) == 0
    th = json.loads((shapes["run"] / "thresholds.json").read_text(encoding="utf-8"))
    rows = _rows(out)
    assert len(rows) == 12
    for r in rows:
        assert {k: r[k] for k in ("needs_review", "review_fields")} == \
            thresholds.flags(r["field_confidence"], r["confidence"], th)
    # without thresholds every answer needs review (said once in the log)
    moved = shapes["run"] / "thresholds.json"
    moved.rename(tmp_path / "thresholds.json")
    try:
        assert run_main("--task", "inference", *shapes["args"], "--input", INCOMING, "--output", out) == 0
    finally:
        (tmp_path / "thresholds.json").rename(moved)
    assert all(r["needs_review"] and "confidence" in r["review_fields"] for r in _rows(out))


# ----------------------------------------------------------------------------------------------------
# 2. the label code: one encoder, one decoder, inverses
def test_label_codes_encode_and_decode_as_inverses():
    import itertools

    from data_loading import decode_code, encode_fields

    chinese = {"positions": [{"field": "状态", "map": {"0": "无泄漏", "1": "泄漏"}},
                             {"field": "夜间", "map": {"0": False, "1": True}},
                             {"field": "等级", "map": {"a": 1, "b": 2, "c": "1"}}]}
    leak = json.loads((ROOT / "data/vlm/label_map.json").read_text(encoding="utf-8"))
    for lm in (chinese, leak):
        for code in itertools.product(*[p["map"] for p in lm["positions"]]):
            code = "".join(code)
            assert encode_fields(decode_code(code, lm), lm) == code
    assert encode_fields({"状态": "泄漏", "夜间": True, "等级": "1"}, chinese) == "11c"   # "1" is not 1
    with pytest.raises(ValueError, match="allows"):
        encode_fields({"状态": "泄漏", "夜间": 1, "等级": 1}, chinese)                   # 1 is not true
    with pytest.raises(ValueError, match="missing"):
        encode_fields({"状态": "泄漏"}, chinese)


def test_label_map_keys_that_cannot_name_a_file_are_refused(tmp_path):
    from config import UserError
    from data_loading import load_label_map

    for key in ("_", "/", "\\"):   # "_" ends the label code; "/" and "\\" would make a correction's name a path
        path = tmp_path / "lm.json"
        path.write_text(json.dumps({"positions": [{"field": "x", "map": {"0": "a", key: "b"}}]}), encoding="utf-8")
        with pytest.raises(UserError, match="cannot stand in a file name"):
            load_label_map(path)


# ----------------------------------------------------------------------------------------------------
# 3. the queue on disk
def _queue(tmp_path, max_items=3):
    from review_queue import ReviewQueue

    lm = json.loads((ROOT / "data/vlm_shapes/label_map.json").read_text(encoding="utf-8"))
    return ReviewQueue("m", tmp_path / "run" / "review", tmp_path / "run" / "reviewed", lm, max_items), lm


def test_queue_orders_bounds_and_never_overwrites(tmp_path):
    from review_queue import ReviewError

    q, lm = _queue(tmp_path)
    png = (INCOMING / "00_incoming000.png").read_bytes()
    ids = [q.add(png, {"shape": "circle", "colour": "red"}, {"shape": c, "colour": 0.9}, c, ["shape"])
           for c in (0.5, 0.2, 0.7)]
    assert [i["id"] for i in q.waiting()] == [ids[1], ids[0], ids[2]]            # least confident first
    # full: a less confident answer takes the place of the most confident one; a more confident one is not kept
    low = q.add(png, {"shape": "square", "colour": "red"}, {"shape": 0.1, "colour": 0.9}, 0.1, ["shape"])
    assert [i["id"] for i in q.waiting()] == [low, ids[1], ids[0]]
    assert not (q.folder / f"{ids[2]}.json").exists() and not (q.folder / f"{ids[2]}.png").exists()
    assert q.add(png, {"shape": "square", "colour": "red"}, {"shape": 0.9, "colour": 0.9}, 0.9, ["shape"]) is None
    # a file of the same name already there is kept; the correction gets a name of its own
    q.reviewed.mkdir(parents=True)
    (q.reviewed / f"21_{low}.png").write_bytes(b"mine")
    done = q.resolve(low, {"shape": "triangle", "colour": "blue"})
    assert (q.reviewed / f"21_{low}.png").read_bytes() == b"mine"
    assert Path(done["file"]).name == f"21_{low}-2.png" and Path(done["file"]).read_bytes() == png
    with pytest.raises(ReviewError) as e:
        q.resolve(low, None)
    assert e.value.status == 404
    # an edited item file cannot name another path to read or remove
    victim = tmp_path / "victim.txt"
    victim.write_text("keep", encoding="utf-8")
    item = json.loads((q.folder / f"{ids[0]}.json").read_text(encoding="utf-8"))
    (q.folder / f"{ids[0]}.json").write_text(json.dumps({**item, "image": "../../victim.txt"}), encoding="utf-8")
    for bad in (ids[0], "../../victim", "0" * 15):
        with pytest.raises(ReviewError):
            q.resolve(bad, None)
    assert victim.read_text(encoding="utf-8") == "keep"
    with pytest.raises(ReviewError, match="allows"):
        q.resolve(ids[1], {"shape": "hexagon"})
    with pytest.raises(ReviewError, match="unknown fields"):
        q.resolve(ids[1], {"size": "big"})
    assert ids[1] in [i["id"] for i in q.waiting()]                                # a refused correction keeps it
    # two reviewers saving the same item at once: one file, one 404
    import concurrent.futures as cf

    def save(_):
        try:
            return q.resolve(ids[1], None)["file"]
        except ReviewError as e:
            return e.status

    with cf.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(save, range(4)))
    assert outcomes.count(404) == 3 and len(list(q.reviewed.glob(f"*{ids[1]}*"))) == 1
    # a server killed between the image and its item file: the image is tidied away at the next start
    (q.folder / ("f" * 16 + ".png")).write_bytes(png)
    (q.folder / ".0123456789abcdef.png.x1.tmp").write_bytes(png)
    (q.folder / "notes.txt").write_text("mine", encoding="utf-8")
    q2, _ = _queue(tmp_path)
    assert sorted(p.name for p in q2.folder.iterdir() if not p.name.endswith(".json")) == [f"{ids[0]}.png",
                                                                                           "notes.txt"]


def test_extra_image_dirs_train_only_and_never_a_validation_copy(tmp_path, caplog):
    from config import build_config
    from data_loading import load_examples

    reviewed = tmp_path / "reviewed"
    reviewed.mkdir()
    cfg = build_config({"model_type": "vlm", "image_dir": str(ROOT / "data/vlm_shapes/images"),
                        "label_map_file": str(ROOT / "data/vlm_shapes/label_map.json"),
                        "prompt_file": str(ROOT / "data/vlm_shapes/prompt.json"), "validation_split": 0.25,
                        "output_dir": str(tmp_path / "out"), "model_name_or_path": "m",
                        "extra_image_dirs": [str(reviewed)]}, "test")
    first = load_examples(cfg, for_training=True)
    split = (cfg.run_dir / "split.json").read_text(encoding="utf-8")
    shutil.copy(INCOMING / "10_incoming004.png", reviewed / "21_aaaaaaaaaaaaaaaa.png")   # a correction
    val = Path(first["validation"][0].image)
    shutil.copy(val, reviewed / f"{val.name.split('_')[0]}_bbbbbbbbbbbbbbbb.png")         # a validation image
    with caplog.at_level("INFO"):
        second = load_examples(cfg, for_training=True)
    assert (cfg.run_dir / "split.json").read_text(encoding="utf-8") == split
    assert [e.image for e in second["validation"]] == [e.image for e in first["validation"]]
    added = [e for e in second["train"] if Path(e.image).parent == reviewed]
    assert [Path(e.image).name for e in added] == ["21_aaaaaaaaaaaaaaaa.png"]
    assert json.loads(added[0].target) == {"shape": "triangle", "colour": "blue"}
    assert "1 corrected images from" in caplog.text and "is a copy of the validation image" in caplog.text
    assert len(load_examples(cfg, for_training=False)["train"]) == len(first["train"])   # evaluate: unchanged


def test_init_adapter_starts_from_the_saved_adapter(models, tmp_path):
    """One optimizer step at a negligible learning rate: from init_adapter the result is that adapter (its
    non-zero B matrices), from scratch it is a fresh one (B = 0)."""
    from safetensors.torch import load_file

    data = tmp_path / "data"
    data.mkdir()
    for f in sorted((ROOT / "data/vlm_shapes/images").iterdir())[::10]:
        shutil.copy(f, data / f.name)
    common = ["--config", SHAPES, "--model_name_or_path", models("qwen3_vl"), "--image_dir", data,
              "--save_strategy", "no", "--eval_strategy", "no", "--freeze_vision_tower", "true"]
    assert run_main("--task", "train", *common, "--output_dir", tmp_path / "a", "--num_train_epochs", "2") == 0
    init = tmp_path / "a" / models("qwen3_vl").name / "lora_model"
    before = load_file(init / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in before.items() if "lora_B" in k)
    for out, extra in (("b", ["--init_adapter", init]), ("c", [])):
        assert run_main("--task", "train", *common, *extra, "--output_dir", tmp_path / out, "--max_steps", "1",
                        "--learning_rate", "1e-12", "--lora_r", "4") == 0
        after = load_file(tmp_path / out / models("qwen3_vl").name / "lora_model" / "adapter_model.safetensors")
        b = {k: v for k, v in after.items() if "lora_B" in k}
        if extra:   # its r (16), not --lora_r 4, and its weights
            assert set(after) == set(before)
            assert all(float((after[k] - before[k]).abs().max()) < 1e-6 for k in before)
        else:
            assert all(float(v.abs().max()) < 1e-6 for v in b.values()) and next(iter(b.values())).shape[1] == 4
    # an adapter of another label map: its codes would mean other values
    proc = run_cli("--task", "train", *common, "--output_dir", tmp_path / "d", "--init_adapter", init,
                   "--label_map_file", ROOT / "data/vlm/label_map.json", "--prompt_file", ROOT / "data/vlm/prompt.json",
                   "--image_dir", ROOT / "data/vlm/images")
    assert proc.returncode == 2 and "was trained with another label map" in proc.stderr.decode()


# ----------------------------------------------------------------------------------------------------
# 4. the README's inspection loop, end to end: serve -> queue -> correct (page and API) -> retrain -> reload
def test_readme_inspection_loop(shapes, tmp_path):
    from test_serve_vlm import browser_page

    run, label_map, args = shapes["run"], shapes["label_map"], shapes["args"]
    server = Server([*args, "--watch_adapter", "true"], tmp_path / "server.log")
    try:
        client = server.client()
        model = client.models.list().data[0]
        assert model.id == "tiny-qwen3-vl-shapes" and model.model_extra["adapter_revision"]
        first_revision = model.model_extra["adapter_revision"]
        # the README's camera: every incoming image sent once
        proc = subprocess.run([sys.executable, str(ROOT / "scripts/inspect_images.py"), INCOMING, "--url",
                               server.url], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "answers match their file names" in proc.stdout
        before = {}
        for path in sorted(INCOMING.iterdir()):
            choice = _ask(client, model.id, path)
            before[path.name] = json.loads(choice.message.content)
            extra = choice.model_extra
            assert extra["needs_review"] is bool(extra["review_fields"])
        queue = httpx.get(server.url + "/v1/review", timeout=30).json()
        confs = [i["confidence"] for i in queue["data"]]
        assert queue["total"] >= 3 and confs == sorted(confs)
        # the answers that are wrong: corrected to what their names say (the page for the first, the API next)
        wrong = [p for p in sorted(INCOMING.iterdir()) if before[p.name] != _truth(p, label_map)]
        items = {}
        for item in queue["data"]:
            image = httpx.get(server.url + item["image_url"], timeout=30).content
            name = next((p.name for p in INCOMING.iterdir() if p.read_bytes() == image), None)
            items.setdefault(name, item)
        fix = [p for p in wrong if p.name in items][:3]
        assert len(fix) >= 2, f"the model got {len(wrong)} of 12 wrong; too few to correct"
        reviewed = run / "reviewed"
        with browser_page(server.url + "/") as page:
            page.click("#tab-review")
            card = page.locator(f'.item[data-id="{items[fix[0].name]["id"]}"]')
            card.wait_for(timeout=30_000)
            page.wait_for_function("id => document.querySelector(`.item[data-id='${id}'] img`).naturalWidth > 0",
                                   arg=items[fix[0].name]["id"], timeout=30_000)
            for field, value in _truth(fix[0], label_map).items():
                card.locator(f'select[name="{field}"]').select_option(json.dumps(value))
            card.locator("button.save").click()
            page.wait_for_selector("#review-status:has-text('Saved')", timeout=30_000)
            assert card.count() == 0
        for path in fix[1:]:
            r = httpx.post(f"{server.url}/v1/review/{items[path.name]['id']}", json={"fields": _truth(path, label_map)},
                           timeout=30)
            assert r.status_code == 200, r.text
        from data_loading import decode_code, label_code

        saved = sorted(reviewed.iterdir())
        assert len(saved) == len(fix)
        for path in fix:
            twin = next(f for f in saved if f.read_bytes() == path.read_bytes())
            assert decode_code(label_code(twin), label_map) == _truth(path, label_map)   # the name decodes back
        # retrain from the served adapter with the corrections, as the README says; the server picks it up
        proc = run_cli("--task", "train", *args, "--extra_image_dirs", reviewed, "--init_adapter",
                       run / "lora_model", "--num_train_epochs", "20", timeout=900)
        log = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, log[-3000:]
        assert f"{len(fix)} corrected images from {reviewed}" in log and "training starts from the adapter" in log
        _wait(lambda: client.models.list().data[0].model_extra["adapter_revision"] != first_revision, 60,
              "the server to reload the retrained adapter")
        assert "reloaded the adapter" in server.log() and "computed for an earlier adapter" in server.log()
        after = {p.name: json.loads(_ask(client, model.id, p).message.content) for p in fix}
        right_before = sum(before[p.name][f] == v for p in fix for f, v in _truth(p, label_map).items())
        right_after = sum(after[p.name][f] == v for p in fix for f, v in _truth(p, label_map).items())
        assert right_after > right_before
        assert sum(after[p.name] == _truth(p, label_map) for p in fix) >= 1
        # evaluate again: new thresholds for the new adapter; a reload with no new adapter reads them
        proc = run_cli("--task", "evaluate", *args, timeout=900)
        assert proc.returncode == 0
        _wait(lambda: "read the new" in server.log(), 30, "the watcher to read the new thresholds.json")
        r = httpx.post(server.url + "/v1/models/reload", json={}, timeout=120).json()
        assert r["data"][0]["reloaded"] is False
        th = json.loads((run / "thresholds.json").read_text(encoding="utf-8"))
        assert th["adapter_revision"] == client.models.list().data[0].model_extra["adapter_revision"]
    finally:
        assert server.stop() == 0


# ----------------------------------------------------------------------------------------------------
# 5. two runs of one base on one server; the review routes' key and refusals; a failed reload
@pytest.fixture(scope="module")
def two_runs(shapes, tmp_path_factory):
    """A second run of the same base model on the leak demo's images and label map."""
    tmp = tmp_path_factory.mktemp("second")
    base = shapes["tmp"] / "tiny-qwen3-vl-shapes"
    leak = ["--config", LEAK, "--model_name_or_path", base, "--output_dir", tmp / "out", "--num_train_epochs", "3",
            "--image_min_pixels", "4096", "--image_max_pixels", "16384"]
    assert run_main("--task", "train", *leak) == 0
    return tmp / "out" / "tiny-qwen3-vl-shapes", leak


def test_two_runs_answer_each_with_its_own_adapter(shapes, two_runs, tmp_path):
    run_b, leak = two_runs
    shape_img = sorted(INCOMING.iterdir())[:4]
    leak_img = sorted((ROOT / "data/vlm/images").iterdir())[::15]
    expected = {}
    for name, args, images in (("a", shapes["args"], shape_img), ("b", leak, leak_img)):
        folder = tmp_path / name
        folder.mkdir()
        for f in images:
            shutil.copy(f, folder / f.name)
        out = tmp_path / f"{name}.jsonl"
        assert run_main("--task", "inference", *args, "--input", folder, "--output", out) == 0
        expected[name] = {Path(r["file"]).name: r for r in _rows(out)}
    server = Server(["--config", SHAPES, "--model_name_or_path", shapes["tmp"] / "tiny-qwen3-vl-shapes",
                     "--serve_runs", f"a={shapes['run']}", f"b={run_b}", "--api_key", "k3y"], tmp_path / "s.log")
    try:
        client = server.client(api_key="k3y")
        assert [m.id for m in client.models.list().data] == ["a", "b", "tiny-qwen3-vl-shapes-base"]
        import concurrent.futures as cf

        jobs = [("a", p) for p in shape_img] + [("b", p) for p in leak_img]
        with cf.ThreadPoolExecutor(8) as pool:   # interleaved: batches form from both, and must not mix
            answers = list(pool.map(lambda j: (j, _ask(client, j[0], j[1])), jobs * 2))
        for (name, path), choice in answers:
            want = expected[name][path.name]
            assert json.loads(choice.message.content) == want["prediction"], (name, path.name)
            assert choice.model_extra["field_confidence"] == pytest.approx(want["field_confidence"], abs=2e-4)
        info = httpx.get(server.url + "/v1/info", headers={"Authorization": "Bearer k3y"}).json()
        assert set(info["per_model"]["a"]["fields"]) == {"shape", "colour"}
        assert set(info["per_model"]["b"]["fields"]) == {"status", "sub_type", "is_night_mode"}
        # each run's own queue, in its own folder
        key = {"Authorization": "Bearer k3y"}
        for name in ("a", "b"):
            listed = httpx.get(server.url + f"/v1/review?model={name}", headers=key).json()["data"]
            assert listed and {i["model"] for i in listed} == {name}
        assert any((run_b / "review").glob("*.json"))
        # the same key as the API
        item = httpx.get(server.url + "/v1/review?model=b", headers=key).json()["data"][0]
        for method, path in (("GET", "/v1/review"), ("GET", item["image_url"]), ("POST", f"/v1/review/{item['id']}"),
                             ("POST", "/v1/models/reload")):
            r = httpx.request(method, server.url + path, json={"accept": True})
            assert r.status_code == 401, (method, path)
        # refusals name the fix; nothing is saved
        for body, status, fragment in (({"fields": {"status": "Broken"}}, 400, "allows"),
                                       ({"fields": {"colour": "red"}}, 400, "unknown fields"),
                                       ({"fields": {}, "accept": True}, 400, "or {\"accept\": true}"),
                                       ([], 400, "or {\"accept\": true}")):
            r = httpx.post(f"{server.url}/v1/review/{item['id']}", json=body, headers=key)
            assert r.status_code == status and fragment in r.json()["error"]["message"], r.text
        for bad in ("..%2F..%2Fetc", "0123456789abcdef"):
            assert httpx.post(f"{server.url}/v1/review/{bad}", json={"accept": True}, headers=key).status_code == 404
        r = httpx.post(f"{server.url}/v1/review/{item['id']}", json={"accept": True}, headers=key).json()
        assert Path(r["file"]).parent == run_b / "reviewed" and r["fields"] == {k: item["answer"][k] for k in
                                                                               ("status", "sub_type", "is_night_mode")}
        # a broken adapter file: the reload fails, says why, and the old adapter keeps answering
        weights = run_b / "lora_model" / "adapter_model.safetensors"
        good = weights.read_bytes()
        weights.write_bytes(b"not safetensors")
        try:
            r = httpx.post(server.url + "/v1/models/reload", json={"model": "b"}, headers=key, timeout=120).json()
            assert r["data"][0]["reloaded"] is False and r["data"][0]["error"]
        finally:
            weights.write_bytes(good)
        path = leak_img[0]
        assert json.loads(_ask(client, "b", path).message.content) == expected["b"][path.name]["prediction"]
    finally:
        assert server.stop() == 0


def test_a_reload_waits_for_the_running_batch_and_the_next_batch_gets_the_new_adapter():
    """Scheduler.call runs between batches: the batch in flight finishes on the adapter it started with."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from batching import Job, Scheduler
    from data_loading import Example
    from generation import Row

    started, seen = threading.Event(), []

    class Engine:
        def generate_rows(self, rows, adapter=None, **kw):
            seen.append(("batch", adapter))
            started.set()
            time.sleep(0.5)
            seen.append(("end", adapter))
            for r in rows:
                r.finish_reason = "stop"

    served = SimpleNamespace(name="m", engine=Engine(), adapter="old")

    def reload():
        seen.append(("reload", served.adapter))
        served.adapter = "new"
        return "done"

    async def scenario():
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(4, 8)
        scheduler.start()

        def job():
            return Job(row=Row(example=Example("q", "")), temperature=0.0, top_p=1.0, seed=None, served=served,
                       confidences=False, explicit_max_tokens=False, loop=loop, future=loop.create_future())

        first = job()
        assert scheduler.submit(first)
        await asyncio.to_thread(started.wait, 10)
        future = scheduler.call(reload)   # asked for while the first batch runs
        second = job()
        assert scheduler.submit(second)
        await asyncio.wait_for(asyncio.gather(first.future, second.future), 30)
        assert await asyncio.to_thread(future.result, 10) == "done"
        scheduler.stop()

    asyncio.run(scenario())
    assert seen == [("batch", "old"), ("end", "old"), ("reload", "old"), ("batch", "new"), ("end", "new")]


def test_a_full_disk_costs_the_queue_place_not_the_answer(tmp_path, monkeypatch, caplog):
    import errno
    from types import SimpleNamespace

    from openai_api import parse_request
    from serve import Service

    q, _ = _queue(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("review_queue.atomic_write_bytes", full)
    notes = {"needs_review": True, "parsed": {"shape": "circle", "colour": "red"}, "review_fields": ["shape"],
             "field_confidence": {"shape": 0.4, "colour": 0.9}, "confidence": 0.36}
    job = SimpleNamespace(served=SimpleNamespace(queue=q), notes=notes)
    req = parse_request({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _url(INCOMING / "00_incoming000.png")}}]}]})
    service = Service.__new__(Service)   # only what queue_for_review reads
    service.image_folder = None
    service.queue_for_review(req, job)
    assert notes["review_id"] is None and not q.waiting()
    assert "could not queue an answer for review" in caplog.text and "No space left" in caplog.text
