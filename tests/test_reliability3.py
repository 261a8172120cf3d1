"""Reliability, round three: each test fails without the fix it names (issue: non-ASCII label maps, prefix
values, line splitting, the report's embedded JSON, gradients in evaluate, warmup clashes, empty inputs)."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from config import UserError, build_config
from conftest import ROOT, run_main, write_json
from structured import field_confidences, with_confidence

DEMO_VLM = str(ROOT / "configs" / "demo_vlm.yaml")
CHINESE_MAP = {"mapping_type": "positional",
               "positions": [{"field": "表面", "map": {"0": "正常", "1": "划痕"}},
                             {"field": "等级", "map": {"0": "轻", "1": "重"}}],
               "defaults": {"confidence": 1.0}}


def _whole_sequence(model, tok, inputs, prefix, values, tail):
    """Each candidate scored on its own, from the answer's start: the reference for field_confidences."""
    totals = {}
    for value in values:
        ids = inputs["input_ids"][0].tolist() + tok(prefix + value + tail, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        start = inputs["input_ids"].shape[1]
        totals[value] = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
    norm = math.log(sum(math.exp(v) for v in totals.values()))
    return {v: math.exp(x - norm) for v, x in totals.items()}


@pytest.fixture(scope="module")
def qwen3(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(models("qwen3")).eval(),
            AutoTokenizer.from_pretrained(models("qwen3")))


def test_non_ascii_field_names_keep_their_confidence(qwen3):
    model, tok = qwen3
    inputs = tok(["检查这个零件"], return_tensors="pt")
    answer = '{"表面": "划痕", "等级": "重", "confidence": 0.5}'
    dists = field_confidences(model, tok, inputs, answer, CHINESE_MAP)
    assert set(dists) == {"表面", "等级"}                       # was {}: the key was searched ASCII-escaped
    ref = _whole_sequence(model, tok, inputs, '{"表面": ', ['"正常"', '"划痕"'], ",")
    assert dists["表面"] == pytest.approx(ref, rel=1e-3)
    parsed = json.loads(answer)
    note = with_confidence(parsed, dists, keep_model_confidence=False)
    assert note["confidence"] == pytest.approx(dists["表面"]['"划痕"'] * dists["等级"]['"重"'])
    assert parsed["confidence"] == round(note["confidence"], 4)   # the model's 0.5 is replaced


def test_prefix_values_score_the_longest_match(qwen3):
    model, tok = qwen3
    label_map = {"positions": [{"field": "n", "map": {"0": 1, "1": 10}}]}
    inputs = tok(["数一数"], return_tensors="pt")
    dists = field_confidences(model, tok, inputs, '{"n": 10}', label_map)
    # The answer continues after 10 with "}", not with "0}" after 1: candidates end with "}".
    assert dists["n"] == pytest.approx(_whole_sequence(model, tok, inputs, '{"n": ', ["1", "10"], "}"), rel=1e-3)


def test_chinese_label_map_end_to_end(models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    colours = {"0": (200, 200, 200), "1": (200, 60, 60)}
    for code in ("00", "01", "10", "11"):
        for i in range(5):
            Image.new("RGB", (48 + 4 * i, 48), colours[code[0]]).save(images / f"{code}_{i}.png")
    write_json(tmp_path / "label_map.json", CHINESE_MAP)
    (tmp_path / "prompt.txt").write_text("检查零件表面，回答 JSON。", encoding="utf-8")
    args = ["--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"), "--image_dir", images,
            "--label_map_file", tmp_path / "label_map.json", "--prompt_file", tmp_path / "prompt.txt",
            "--output_dir", tmp_path / "out", "--image_max_pixels", "4096", "--num_train_epochs", "2",
            "--save_strategy", "no"]
    assert run_main("--task", "train", *args) == 0
    assert run_main("--task", "evaluate", *args) == 0
    run_dir = next((tmp_path / "out").iterdir())
    res = json.loads((run_dir / "eval_results.json").read_text(encoding="utf-8"))
    for field in ("表面", "等级"):
        assert res["calibration"][field]["n"] == res["num_samples"]     # was 0
    rows = [json.loads(x) for x in (run_dir / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        assert set(r["field_confidence"]) == {"表面", "等级"}
        assert r["prediction"]["confidence"] == round(r["confidence"], 4)
    html = (run_dir / "eval_report.html").read_text(encoding="utf-8")
    embedded = re.search(r"<script type='application/json' id='results'>(.*?)</script>", html, re.S).group(1)
    assert json.loads(embedded)["calibration"]["表面"]["n"] == res["num_samples"]   # parses as written
    out = tmp_path / "preds.jsonl"
    assert run_main("--task", "inference", *args, "--input", images, "--output", out) == 0
    preds = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert all(set(p["field_confidence"]) == {"表面", "等级"} and p["confidence"] is not None for p in preds)


def test_report_json_is_safe_inside_a_script_element(tmp_path):
    from config import build_config
    from report import write_report

    data = {"raw": "</script><script>alert(1)</script> & <b>", "中文": "值"}
    row = {"text": "<script>alert(2)</script>", "target": "<b>答</b>", "prediction": "<i>答</i>"}
    write_report(tmp_path / "r.html", build_config({}, "x.yaml", library_checks=False), data, [row])
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    text = re.search(r"<script type='application/json' id='results'>(.*?)</script>", page, re.S).group(1)
    assert "</script>" not in text and "<b>" not in text and "&" not in text
    assert json.loads(text) == data                 # html.escape'd JSON (&quot;) did not parse
    assert "alert(2)" in page and "<script>alert(2)" not in page and "<i>" not in page   # escaped by the template


def test_lines_split_at_newline_only(tmp_path):
    from answer_io import _read_text_inputs
    from data_loading import load_data_file

    rows = [{"text": "第一行\u2028仍是第一行\u0085", "target": "好\u2029"}, {"text": "第二", "target": "是"}]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert [e.prompt for e in _read_text_inputs(jsonl)] == [rows[0]["text"], "第二"]
    assert [e.target for e in load_data_file(jsonl)] == ["好\u2029", "是"]
    txt = tmp_path / "q.txt"
    txt.write_text("一\u2028二\n三\r\n", encoding="utf-8")
    assert [e.prompt for e in _read_text_inputs(txt)] == ["一\u2028二", "三"]


def test_eval_loss_runs_without_gradients(qwen3):
    from data_loading import Example
    from data_processing import Encoder
    from metrics import answer_loss_sums

    model, tok = qwen3
    cfg = build_config({"max_length": 64}, "test")
    samples = [Encoder(tok, cfg)(Example("你好", "好"))]
    seen = []
    handle = model.register_forward_hook(lambda *a: seen.append(torch.is_grad_enabled()))
    try:
        total, count = answer_loss_sums(model, tok, samples, 1)
    finally:
        handle.remove()
    assert seen == [False] and count > 0 and total > 0


def test_warmup_ratio_and_steps_clash():
    with pytest.raises(UserError, match="`warmup_ratio` and `warmup_steps` are both set"):
        build_config({"warmup_ratio": 0.5}, "x.yaml", {"warmup_steps": "4"})
    cfg = build_config({}, "x.yaml", {"warmup_steps": "4"})       # the ratio's default gives way, logged at train
    assert cfg.trainer_args["warmup_steps"] == 4


def test_compare_of_an_empty_input_file(models, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    code = run_main("--task", "compare", "--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path",
                    models("qwen3"), "--output_dir", tmp_path / "out", "--input", empty)
    assert code == 2 and "holds no inputs" in capsys.readouterr().err          # was KeyError: 'base'


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    from conftest import small_llm_data

    tmp = tmp_path_factory.mktemp("rel3")
    args = ["--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path", models("qwen3"), "--output_dir",
            tmp / "out", "--data_dir", small_llm_data(tmp / "data"), "--num_train_epochs", "1", "--save_strategy",
            "no", "--eval_strategy", "no"]
    assert run_main("--task", "train", *args) == 0
    return tmp, args


def test_export_keeps_files_it_did_not_write_and_cleans_its_temporaries(trained, capsys):
    import os

    tmp, args = trained
    run_dir = tmp / "out" / "tiny-qwen3"
    stale = run_dir / ".merged.abc123.tmp"          # what a killed export leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        assert run_main("--task", "export", *args) == 0
    finally:
        os.umask(old)
    assert not stale.exists()
    merged = run_dir / "merged"
    for f in [*merged.iterdir(), *(run_dir / "lora_model").iterdir()]:
        assert f.stat().st_mode & 0o777 == 0o644, f            # was 0600 for the weights
    (merged / "mine.gguf").write_bytes(b"user's file")
    capsys.readouterr()
    assert run_main("--task", "export", *args) == 2
    err = capsys.readouterr().err
    assert "holds files this tool did not write (mine.gguf)" in err
    assert (merged / "mine.gguf").read_bytes() == b"user's file"
    (merged / "mine.gguf").unlink()
    assert run_main("--task", "export", *args) == 0              # its own files it replaces


def test_no_task_writes_into_the_model_folder(trained, tmp_path):
    tmp, _ = trained
    # An export of an export: run folder out/merged, model out/merged/merged, which export would replace.
    with pytest.raises(UserError, match="inside the run folder"):
        build_config({"model_name_or_path": str(tmp / "out" / "merged" / "merged"), "output_dir": str(tmp / "out")},
                     "x.yaml")
    model = tmp_path / "model"
    write_json(model / "config.json", {"model_type": "qwen3"})
    with pytest.raises(UserError, match="inside the model folder"):
        build_config({"model_name_or_path": str(model), "output_dir": str(model / "runs")}, "x.yaml")


def test_conversations_refuse_two_turns_of_one_role(tmp_path):
    from data_loading import load_data_file

    path = write_json(tmp_path / "train.json", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]}])
    with pytest.raises(UserError, match=r"entry 0, turn 3: two user turns in a row; merge them"):
        load_data_file(path)


def test_llamafactory_system_and_history_fields_are_read(models, tmp_path):
    from transformers import AutoTokenizer

    from data_loading import load_data_file
    from data_processing import IGNORE_INDEX, Encoder

    share = write_json(tmp_path / "s.json", [{"system": "你是客服。", "conversations": [
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "您好"}]}])
    (ex,) = load_data_file(share)
    assert ex.system == "你是客服。"                                  # was dropped
    both = write_json(tmp_path / "b.json", [{"system": "x", "messages": [
        {"role": "system", "content": "y"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(UserError, match="both a top-level"):
        load_data_file(both)
    alpaca = write_json(tmp_path / "a.json", [{"instruction": "第二问", "input": "", "output": "第二答",
                                              "history": [["第一问", "第一答"]]}])
    (ex,) = load_data_file(alpaca)
    assert [t["content"] for t in ex.messages] == ["第一问", "第一答", "第二问", "第二答"]
    tok = AutoTokenizer.from_pretrained(models("qwen3"))
    sample = Encoder(tok, build_config({"max_length": 256}, "test"))(ex)
    trained = tok.decode([t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != IGNORE_INDEX])
    assert "第一答" in trained and "第二答" in trained and "第一问" not in trained   # both answers trained
    bad = write_json(tmp_path / "bad.json", [{"instruction": "q", "output": "a", "history": ["q0"]}])
    with pytest.raises(UserError, match="history"):
        load_data_file(bad)


def test_weighted_sampler_order_is_a_function_of_seed_and_epoch():
    from sampling import WeightedSampler

    weights = [1.0] * 30 + [5.0] * 10
    first = WeightedSampler(weights, seed=3)
    epochs = []
    for epoch in range(3):
        first.set_epoch(epoch)
        epochs.append(list(first))
    resumed = WeightedSampler(weights, seed=3)          # a resumed run: a new process, a new sampler
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]                  # WeightedRandomSampler drew epoch 0's order again
    assert epochs[0] != epochs[1] and len(epochs[0]) == 40
    heavy = sum(i >= 30 for e in epochs for i in e) / 120
    assert 0.5 < heavy < 0.8                           # weight 50 of 80: 62.5% of the draws expected


@pytest.mark.parametrize("cli,fragment", [
    ({"lr_scheduler_kwargs": '{"foo": 1}'}, "`lr_scheduler_kwargs` {'foo': 1} do not fit lr_scheduler_type cosine"),
    ({"optim": "galore_adamw"}, "`optim` galore_adamw: You need to install `galore_torch`"),
    ({"push_to_hub": "true"}, "`push_to_hub`: the Hugging Face Hub is off"),
    ({"metric_for_best_model": "eval_accuracy"}, "reports only the validation loss"),
])
def test_trainer_options_fail_at_start_up_in_one_line(cli, fragment, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        build_config({}, "x.yaml", cli)
    assert fragment in str(e.value) and "Traceback" not in str(e.value)


def test_valid_optimizer_options_pass():
    cfg = build_config({}, "x.yaml", {"optim": "adafactor", "lr_scheduler_kwargs": "{}",
                                      "metric_for_best_model": "loss"})
    assert cfg.trainer_args["optim"] == "adafactor"


def test_full_disk_from_the_safetensors_writer_is_one_line(monkeypatch, capsys):
    import main

    def full(cfg):
        raise Exception("No space left on device (os error 28)")   # what safetensors' Rust writer raises

    monkeypatch.setitem(main.TASKS, "train", full)
    assert main.main(["--task", "train", "--config", str(ROOT / "configs/demo_llm.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: could not write: no space left" in err and "Traceback" not in err


def test_evaluation_during_training_keeps_its_order():
    from train import _LoraTrainer

    class Args:
        world_size = 1
        train_sampling_strategy = "group_by_length"

    trainer = _LoraTrainer.__new__(_LoraTrainer)
    trainer.args = Args()
    sampler = trainer._get_eval_sampler(list(range(5)))
    assert list(sampler) == [0, 1, 2, 3, 4] and type(sampler).__name__ == "SequentialSampler"


def test_nccl_process_group_sets_each_process_device(monkeypatch):
    import torch
    import torch.distributed as dist

    import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("device", d)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("group", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert distributed.world() == (1, 2)
    assert calls == [("device", 1), ("group", "nccl")]


def test_load_best_model_at_end_sees_the_runs_own_strategies():
    cfg = build_config({}, "x.yaml", {"load_best_model_at_end": "true"})    # defaults: epoch and epoch
    assert cfg.trainer_args["load_best_model_at_end"] is True                  # was refused: "eval: no"
    with pytest.raises(UserError, match=r"with this run's save_strategy=epoch, eval_strategy=no"):
        build_config({"eval_strategy": "no"}, "x.yaml", {"load_best_model_at_end": "true"})


def test_zero3_without_gathered_weights_fails_before_training(tmp_path, monkeypatch):
    from train import _check_zero3_save

    ds = write_json(tmp_path / "ds.json", {"zero_optimization": {"stage": 3}})
    cfg = build_config({}, "x.yaml")
    cfg.trainer_args = {"deepspeed": str(ds)}
    with pytest.raises(UserError, match="stage3_gather_16bit_weights_on_model_save"):
        _check_zero3_save(cfg)
    write_json(ds, {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}})
    _check_zero3_save(cfg)
    cfg.trainer_args = {}
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")
    with pytest.raises(UserError, match="zero3_save_16bit_model: true"):
        _check_zero3_save(cfg)


def test_vlm_session_logs_no_library_deprecation(models, tmp_path):
    from conftest import run_cli

    args = ["--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"), "--output_dir", tmp_path / "out",
            "--num_train_epochs", "1", "--save_strategy", "no"]
    train = run_cli("--task", "train", *args)
    assert train.returncode == 0
    assert "Kwargs passed" not in train.stderr.decode()   # was: 178 times, the processor's options per call
    image = sorted((ROOT / "data/vlm/images").iterdir())[0]
    proc = run_cli("--task", "inference", *args, stdin=f"{image}\n")
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "field confidence" in proc.stdout.decode()
    assert "deprecated" not in err and "FutureWarning" not in err, err[-1500:]   # was: past_key_values


def test_rising_validation_loss_is_said_once(caplog):
    import logging
    from types import SimpleNamespace

    from train import _RisingValidationLoss

    callback = _RisingValidationLoss(patience=2)
    with caplog.at_level(logging.WARNING):
        for epoch, loss in enumerate([0.9, 0.5, 0.55, 0.5, 0.6, 0.7, 0.8], 1):
            callback.on_evaluate(None, SimpleNamespace(epoch=float(epoch)), None, metrics={"eval_loss": loss})
    warnings = [r.getMessage() for r in caplog.records if "validation loss has risen" in r.getMessage()]
    assert len(warnings) == 1                                     # 0.5 -> 0.6 -> 0.7, said once, not again at 0.8
    assert "best 0.5000 at epoch 2.00, now 0.7000" in warnings[0]


def test_chinese_labels_in_plots_warn_once_not_per_glyph(tmp_path, caplog):
    import logging
    import warnings

    import metrics

    m = {"labels": ["正常", "划痕"], "confusion_matrix": [[3, 1], [0, 2]], "accuracy": 0.83}
    monkey_said = metrics._missing_glyphs_said
    metrics._missing_glyphs_said = False
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            for i in range(3):
                metrics.plot_confusion("表面", m, tmp_path / f"c{i}.png")
    finally:
        metrics._missing_glyphs_said = monkey_said
    assert not [w for w in caught if "missing from font" in str(w.message)]    # was one per glyph and figure
    said = [r for r in caplog.records if "label characters as boxes" in r.getMessage()]
    assert len(said) == (0 if metrics.cjk_font() else 1)
    assert (tmp_path / "c2.png").stat().st_size > 1000


def test_best_adapter_by_validation_loss_is_kept_by_default(models, tmp_path, caplog):
    """Validation at every checkpoint: the adapter is the checkpoint of the lowest validation loss, not the last
    (this run over-fits); --load_best_model_at_end false keeps the last weights."""
    import logging

    from safetensors.torch import load_file

    data = tmp_path / "data"   # validation answers unlike every training answer: memorising them over-fits
    write_json(data / "train.json", [{"text": f"Question {i}?", "target": "The answer is blue."} for i in range(8)])
    write_json(data / "validation.json", [{"text": f"问题{i}？", "target": f"完全不同的答案{i}。"} for i in range(2)])
    config = tmp_path / "demo.yaml"   # the demo config without its load_best_model_at_end: false
    config.write_text("".join(line for line in (ROOT / "configs/demo_llm.yaml").read_text().splitlines(True)
                              if not line.startswith("load_best_model_at_end")))
    common = ["--config", config, "--tiny_model", "null", "--model_name_or_path",
              models("qwen3"), "--data_dir", data, "--num_train_epochs", "8", "--learning_rate", "0.05",
              "--save_total_limit", "null"]
    runs = {}
    for name, extra in (("best", []), ("last", ["--load_best_model_at_end", "false"])):
        with caplog.at_level(logging.INFO):
            assert run_main("--task", "train", *common, "--output_dir", tmp_path / name, *extra) == 0
        runs[name] = tmp_path / name / "tiny-qwen3"
    state = json.loads((runs["best"] / "trainer_state.json").read_text())
    losses = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}
    best_step = min(losses, key=losses.get)
    assert best_step != max(losses), losses                       # the run over-fits: best is not the last
    assert json.loads((runs["best"] / "train_results.json").read_text())["best_checkpoint"] == f"checkpoint-{best_step}"
    assert f"adapter: the best checkpoint by validation loss, checkpoint-{best_step}" in caplog.text

    def weights(folder):
        return load_file(folder / "adapter_model.safetensors")

    kept, best_ckpt = weights(runs["best"] / "lora_model"), weights(runs["best"] / f"checkpoint-{best_step}")
    assert all(torch.equal(kept[k], best_ckpt[k]) for k in kept)
    last = weights(runs["last"] / "lora_model")
    last_ckpt = weights(runs["last"] / f"checkpoint-{max(losses)}")
    assert all(torch.equal(last[k], last_ckpt[k]) for k in last)
    assert json.loads((runs["last"] / "train_results.json").read_text())["best_checkpoint"] is None


def test_best_adapter_only_where_each_save_has_an_evaluation():
    from config import build_config
    from train import keeps_best

    def keeps(**raw):
        return keeps_best(build_config(raw, "test"))

    assert keeps()                                                          # epoch and epoch
    assert not keeps(eval_strategy="no")
    assert not keeps(save_strategy="steps")                                  # evaluations per epoch, saves per step
    assert keeps(save_strategy="steps", eval_strategy="steps", save_steps=500, eval_steps=100)
    assert not keeps(save_strategy="steps", eval_strategy="steps", save_steps=500, eval_steps=300)
    assert not keeps(load_best_model_at_end=False)


def test_start_up_leaves_out_libraries_the_run_cannot_use(models, tmp_path):
    """A command-line run that quantizes nothing and reads no hub dataset does not import bitsandbytes or datasets
    (about a second of every start); any sign that it may need them keeps them."""
    from conftest import run_cli
    from main import unused_libraries

    tiny = models("qwen3")

    def unused(**raw):
        left_out = unused_libraries(build_config({"model_name_or_path": tiny, "task": "train", **raw}, "test"))
        return [name for name in left_out if name in ("bitsandbytes", "datasets")]

    assert unused() == ["bitsandbytes", "datasets"]
    assert unused(train_quantization_bit=4) == ["datasets"]
    assert unused(inference_quantization_bit=8) == ["datasets"]
    assert unused(optim="paged_adamw_32bit") == ["datasets"]
    assert unused(dataset_name="some/dataset") == ["bitsandbytes"]
    assert unused(model_name_or_path="Qwen/Qwen3-1.7B") == ["datasets"]   # not a local folder: unknown
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((Path(tiny) / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    assert unused(model_name_or_path=str(quantized)) == ["datasets"]

    def others(**raw):
        left_out = unused_libraries(build_config({"model_name_or_path": tiny, **raw}, "test"))
        return [name for name in left_out if name not in ("bitsandbytes", "datasets")]

    assert others(task="train") == ["scipy", "sklearn", "torchvision"]
    assert others(task="serve", model_type="vlm") == ["scipy", "sklearn"]   # VLM processors use torchvision
    assert others(task="evaluate") == ["torchvision"]                      # per-field metrics use scikit-learn
    assert others(task="compare", model_type="vlm") == []

    proc = run_cli("--task", "train", "--config", ROOT / "configs" / "demo_llm.yaml", "--model_name_or_path", tiny,
                   "--output_dir", tmp_path / "out", "--max_steps", "1", "--log_level", "debug")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "not imported (this run cannot use them): bitsandbytes, datasets, scipy, sklearn, torchvision" in err
    results = json.loads((tmp_path / "out" / "tiny-qwen3" / "train_results.json").read_text())
    assert 0 < results["seconds_to_first_step"] < results["train_wall_seconds"] + 60
