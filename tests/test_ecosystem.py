"""Fitting the Hugging Face ecosystem: merged export loadable without PEFT, base-vs-fine-tuned compare from one
load, TrainingArguments pass-through (validated by TrainingArguments), early stopping, TensorBoard, loss curves,
and the data formats users bring (Alpaca, messages, ShareGPT, JSONL, multi-turn)."""

import json
import subprocess
import sys

import pytest
import torch

from config import UserError
from conftest import ROOT, run_cli, run_main, small_llm_data, write_json
from data_loading import load_data_file

DEMO = str(ROOT / "configs" / "demo_llm.yaml")
DEMO_VLM = str(ROOT / "configs" / "demo_vlm.yaml")


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """The tiny LLM demo trained once (memorises data/llm/train.json)."""
    tmp = tmp_path_factory.mktemp("eco")
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp / "out",
            "--data_dir", ROOT / "data" / "llm", "--save_strategy", "no"]
    assert run_main("--task", "train", *args) == 0
    return tmp, args


def _logits_equal(model_a, model_b, ids, **extra):
    with torch.no_grad():
        a = model_a(input_ids=ids, **extra).logits.float()
        b = model_b(input_ids=ids, **extra).logits.float()
    return (a - b).abs().max().item()


def test_export_merges_into_a_folder_plain_transformers_loads(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, args = trained
    assert run_main("--task", "export", *args, "--export_dtype", "float32") == 0
    merged = tmp / "out" / "tiny-qwen3" / "merged"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= \
        {p.name for p in merged.iterdir()}
    template = merged / "chat_template.jinja"
    assert template.is_file() or "chat_template" in (merged / "tokenizer_config.json").read_text()

    # Plain transformers, with peft made unimportable: the folder stands alone.
    code = ("import sys; sys.modules['peft'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
            f"t = AutoTokenizer.from_pretrained({str(merged)!r})\n"
            "print(type(m).__name__, m.generation_config.eos_token_id)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Qwen3ForCausalLM" in proc.stdout, proc.stderr[-2000:]
    # Same logits as base + adapter (tolerance: float32 merge of W + BA, 1e-4).
    base = AutoModelForCausalLM.from_pretrained(str(args[args.index("--model_name_or_path") + 1]))
    with_adapter = PeftModel.from_pretrained(base, str(tmp / "out" / "tiny-qwen3" / "lora_model")).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.randint(5, 1000, (2, 24))
    assert _logits_equal(with_adapter, plain, ids) < 1e-4


def test_export_of_a_vlm_matches_base_plus_adapter(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    args = ["--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"), "--output_dir", tmp_path,
            "--num_train_epochs", "1", "--save_strategy", "no", "--learning_rate", "0.05"]
    assert run_main("--task", "train", *args) == 0
    assert run_main("--task", "export", *args, "--export_dtype", "float32") == 0
    run_dir = next(tmp_path.glob("tiny-*"))
    merged = AutoModelForImageTextToText.from_pretrained(run_dir / "merged").eval()
    base = AutoModelForImageTextToText.from_pretrained(models("qwen3_vl"))
    with_adapter = PeftModel.from_pretrained(base, str(run_dir / "lora_model")).eval()
    processor = AutoProcessor.from_pretrained(run_dir / "merged")
    from data_loading import load_image

    image = load_image(str(sorted((ROOT / "data/vlm/images").iterdir())[0]))
    msgs = [{"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": "look"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        a = with_adapter(**inputs).logits
        b = merged(**inputs).logits
    assert (a - b).abs().max().item() < 1e-4
    from structured import label_schema

    lm = json.loads((run_dir / "lora_model" / "label_map.json").read_text(encoding="utf-8"))
    assert json.loads((run_dir / "merged" / "response_schema.json").read_text()) == label_schema(lm)


def test_export_warns_what_vllm_refuses(tmp_path, caplog):
    from config import build_config
    from export import warn_for_vllm

    cfg = build_config({"model_name_or_path": str(tmp_path / "m"), "output_dir": str(tmp_path / "out")}, "test")
    cfg.lora_dir.mkdir(parents=True)
    (cfg.lora_dir / "adapter_config.json").write_text(json.dumps({"r": 16, "modules_to_save": None}))
    assert warn_for_vllm(cfg) == []
    (cfg.lora_dir / "adapter_config.json").write_text(json.dumps({"r": 48, "modules_to_save": ["visual"]}))
    notes = warn_for_vllm(cfg)
    assert "vision tower" in notes[0] and "--max-lora-rank 64" in notes[1]
    (cfg.lora_dir / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    assert "at most 512" in warn_for_vllm(cfg)[0]


def test_compare_batch_one_load_both_answers(trained, tmp_path, caplog):
    import logging

    tmp, args = trained
    out = tmp_path / "cmp.jsonl"
    with caplog.at_level(logging.INFO):
        assert run_main("--task", "compare", *args, "--input", ROOT / "data/llm/train.json", "--output", out,
                        "--max_new_tokens", "80") == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 15 and {"text", "base", "finetuned", "target"} <= set(rows[0])
    assert sum(r["finetuned"] == r["target"] for r in rows) >= 12       # the adapter was on
    assert sum(r["base"] == r["target"] for r in rows) == 0              # and off for the base answers
    assert caplog.text.count("loaded ") == 2                             # one base load + one adapter load
    assert "finetuned: " in caplog.text and "fine-tuned minus base: exact_match +" in caplog.text


def test_compare_repl_side_by_side(trained):
    _, args = trained
    question = json.loads((ROOT / "data/llm/train.json").read_text(encoding="utf-8"))[2]
    proc = run_cli("--task", "compare", *args, "--max_new_tokens", "80", stdin=question["text"] + "\nquit\n")
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "[base]" in out and "[fine-tuned]" in out and question["target"] in out.split("[fine-tuned]")[1]


def test_trainer_options_pass_through_and_are_validated(models, tmp_path, capsys):
    data = small_llm_data(tmp_path / "d", n_train=8, n_val=2)
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--data_dir", data, "--output_dir",
            tmp_path / "o", "--save_strategy", "no", "--eval_strategy", "no"]
    assert run_main("--task", "train", *args, "--optim", "adamw_torch_fused", "--max_steps", "3",
                    "--report_to", "tensorboard") == 0
    run_dir = tmp_path / "o" / "tiny-qwen3"
    assert json.loads((run_dir / "train_results.json").read_text())["global_step"] == 3   # max_steps won
    saved = (run_dir / "lora_model" / "run_config.yaml").read_text()
    assert "optim: adamw_torch_fused" in saved and "max_steps: 3" in saved
    assert list((run_dir / "runs").rglob("events.out.tfevents.*"))                       # TensorBoard log
    assert (run_dir / "loss.png").stat().st_size > 5000                                   # the loss curves
    assert run_main("--task", "train", *args, "--optim", "nonsense") == 2
    err = capsys.readouterr().err
    assert "TrainingArguments rejected `optim`" in err and "nonsense is not a valid" in err
    assert run_main("--task", "train", *args, "--optimm", "sgd") == 2
    assert "unknown flag --optimm" in capsys.readouterr().err
    assert run_main("--task", "train", *args, "--report_to", "wandb") == 2          # checked before the model loads
    assert "`report_to` wandb needs the wandb package: pip install wandb" in capsys.readouterr().err


def test_early_stopping_keeps_the_best_checkpoint(models, tmp_path, capsys):
    data = small_llm_data(tmp_path / "d", n_train=4, n_val=2)
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--data_dir", data, "--output_dir",
            tmp_path / "o", "--num_train_epochs", "30", "--learning_rate", "0.05", "--lr_scheduler_type", "constant",
            "--save_total_limit", "null"]
    assert run_main("--task", "train", *args, "--early_stopping_patience", "2") == 0
    state = json.loads((tmp_path / "o" / "tiny-qwen3" / "trainer_state.json").read_text())
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert len(evals) < 30                                               # stopped early
    assert state["best_metric"] == pytest.approx(min(evals))
    assert run_main("--task", "train", *args, "--early_stopping_patience", "2", "--eval_strategy", "no") == 2
    assert "needs eval_strategy and save_strategy set alike" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- formats
def test_each_format_is_read(tmp_path):
    alpaca = write_json(tmp_path / "a.json", [{"instruction": "Translate", "input": "chat", "output": "cat",
                                               "system": "be brief"}, {"instruction": "Say hi", "output": "hi"}])
    ex = load_data_file(alpaca)
    assert ex[0].prompt == "Translate\n\nchat" and ex[0].target == "cat" and ex[0].system == "be brief"
    assert ex[1].prompt == "Say hi" and ex[1].system is None
    messages = tmp_path / "m.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                                 {"role": "assistant", "content": "A"}]}) + "\n\n", encoding="utf-8")
    (one,) = load_data_file(messages)
    assert (one.prompt, one.target, one.system, one.messages) == ("U", "A", "S", None)   # single turn
    sharegpt = write_json(tmp_path / "s.json", [{"conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}])
    (multi,) = load_data_file(sharegpt)
    assert multi.prompt == "q2" and multi.target == "a2" and len(multi.messages) == 4


@pytest.mark.parametrize("rows,fragment", [
    ([{"text": "a", "target": "b"}, {"instruction": "x", "output": "y"}], "mixes formats: entry 0 is text/target, "
                                                                          "entry 1 is alpaca"),
    ([{"instruction": "x"}], 'entry 0 has no "output"'),
    ([{"messages": [{"role": "user", "content": "q"}]}], "must end with an assistant turn"),
    ([{"messages": [{"role": "robot", "content": "q"}]}], "role 'robot' is not one of"),
    ([{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]}], "turn 0: 'value' must be"),
    ([{"question": "q", "answer": "a"}], "matches no supported format"),
])
def test_format_errors_name_the_entry(tmp_path, rows, fragment):
    path = write_json(tmp_path / "train.json", rows)
    with pytest.raises(UserError) as e:
        load_data_file(path)
    assert fragment in str(e.value) and str(path) in str(e.value)


def test_multi_turn_trains_every_assistant_turn(models):
    from transformers import AutoTokenizer

    from config import build_config
    from data_processing import Encoder

    tok = AutoTokenizer.from_pretrained(models("qwen3"))
    path_rows = [{"messages": [{"role": "user", "content": "问一"}, {"role": "assistant", "content": "答一"},
                               {"role": "user", "content": "问二"}, {"role": "assistant", "content": "答二"}]}]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (ex,) = load_data_file(write_json(Path(d) / "t.json", path_rows))
    enc = Encoder(tok, build_config({"max_length": 256}, "t"))(ex)
    trained = tok.decode([t for t in enc["labels"] if t != -100])
    assert trained == "答一<|im_end|>答二<|im_end|>"                 # both answers, nothing of the questions
    assert tok.decode(enc["input_ids"]).count("问一") == 1


def test_alpaca_and_multi_turn_files_train_end_to_end(models, tmp_path):
    data = tmp_path / "data"
    write_json(data / "train.json", [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(6)])
    write_json(data / "validation.json", [{"instruction": "问题9", "output": "回答9"}])
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp_path / "o",
            "--num_train_epochs", "2", "--save_strategy", "no"]
    assert run_main("--task", "train", *args, "--data_dir", data) == 0
    conv = tmp_path / "conv"
    turns = [{"conversations": [{"from": "human", "value": f"你好{i}"}, {"from": "gpt", "value": f"好{i}"},
                                {"from": "human", "value": "再见"}, {"from": "gpt", "value": f"再见{i}"}]}
             for i in range(6)]
    (conv).mkdir()
    (conv / "train.jsonl").write_text("\n".join(json.dumps(t, ensure_ascii=False) for t in turns), encoding="utf-8")
    (conv / "validation.jsonl").write_text(json.dumps(turns[0], ensure_ascii=False), encoding="utf-8")
    assert run_main("--task", "train", *args, "--data_dir", conv, "--output_dir", tmp_path / "o2") == 0
    assert run_main("--task", "evaluate", *args, "--data_dir", conv, "--output_dir", tmp_path / "o2") == 0
    rows = [json.loads(x) for x in (tmp_path / "o2" / "tiny-qwen3" / "eval_predictions.jsonl").read_text().splitlines()]
    assert rows[0]["target"] == "再见0" and rows[0]["text"] == "再见"
