"""What a new user meets first: one message for every config problem, --help with defaults, quiet logs,
batch inference that scores itself, and a warning for empty answers."""

import json
import logging

from answer_io import report_empty
from config import build_config
from conftest import ROOT, run_cli, run_main

DEMO = str(ROOT / "configs" / "demo_llm.yaml")


def test_every_problem_in_one_message(capsys):
    assert run_main("--task", "train", "--config", DEMO, "--lora_r", "0", "--train_quantization_bit", "3",
                    "--lora_dropout", "1.5", "--temperature", "abc", "--lora_rank", "16") == 2
    err = capsys.readouterr().err
    for expected in ("`lora_r` = 0: must be > 0", "`train_quantization_bit` = '3' is not allowed",
                     "`lora_dropout` = 1.5: must be in [0, 1)", "`temperature` expected a number",
                     "unknown flag --lora_rank (did you mean `lora_r`?)"):
        assert expected in err, err
    assert "unexpected value" not in err        # the typo'd flag's value is not a second problem
    assert err.count("\n  - ") == 5


def test_help_shows_defaults_choices_and_the_required_task():
    proc = run_cli("--help")
    out = " ".join(proc.stdout.decode().split())  # argparse wraps lines
    assert proc.returncode == 0
    assert "--task {train,evaluate,inference,export,compare,serve}" in out.split("options:")[0]   # usage line
    assert "--lora_r [VALUE] Lora attention dimension (default: 8)" in out   # LoraConfig's own help for r
    assert "(default: auto; one of: auto, float32, float16, bfloat16)" in out


def test_logs_are_short_and_modality_specific(tmp_path, caplog):
    cfg = build_config({"model_type": "llm", "task": "train"}, "test")
    assert "image_dir" not in cfg.relevant() and "system_prompt" in cfg.relevant()
    vlm = build_config({"model_type": "vlm", "task": "train"}, "test")
    assert "image_dir" in vlm.relevant() and "system_prompt" not in vlm.relevant()
    # At the default level a run logs a one-line summary, not the ~70-line resolved configuration.
    with caplog.at_level(logging.INFO):
        run_main("--task", "evaluate", "--config", DEMO, "--output_dir", tmp_path / "out",
                 "--model_name_or_path", tmp_path / "absent")
    assert "evaluate: model" in caplog.text and "resolved configuration" not in caplog.text


def test_batch_inference_scores_itself(models, tmp_path, caplog):
    data = ROOT / "data" / "llm" / "validation.json"
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp_path]
    with caplog.at_level(logging.INFO):
        assert run_main("--task", "inference", *args, "--use_original_model", "--max_new_tokens", "4",
                        "--input", data, "--output", tmp_path / "p.jsonl") == 0
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    exact = sum(r["prediction"].strip() == r["target"].strip() for r in rows)
    assert f"{exact}/{len(rows)} exact (exact_match" in caplog.text


def test_empty_answers_are_counted(caplog):
    cfg = build_config({"use_original_model": True}, "test")
    with caplog.at_level(logging.WARNING):
        assert report_empty(["", "  ", "ok"], cfg) == 2
    assert "2 of 3 answers from the base model (--use_original_model) are empty" in caplog.text
    caplog.clear()
    assert report_empty(["a"], cfg) == 0 and not caplog.text
