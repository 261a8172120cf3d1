"""LLM correctness: seeded LoRA initialisation, stopping at the template's end-of-turn token, answer-only
masking when pad = EOS, the template-mismatch warning, and train/inference settings drift."""

import logging

import pytest
from safetensors.torch import load_file

from config import build_config
from conftest import ROOT, run_main, small_llm_data
from data_loading import Example
from data_processing import Encoder, end_of_turn_ids

DEMO = str(ROOT / "configs" / "demo_llm.yaml")


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _cfg(**kw):
    return build_config({"model_type": "llm", "max_length": 128, **kw}, "test")


def test_same_seed_gives_the_same_adapter(models, tmp_path):
    data = small_llm_data(tmp_path / "d", n_train=4, n_val=1)
    weights = []
    for run in ("a", "b"):
        assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3"),
                        "--data_dir", data, "--output_dir", tmp_path / run, "--num_train_epochs", "1",
                        "--save_strategy", "no", "--eval_strategy", "no", "--seed", "7") == 0
        weights.append(load_file(tmp_path / run / "tiny-qwen3" / "lora_model" / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    # lora_A starts random: it is equal only when the initialisation is seeded, not just the training loop.
    for key in weights[0]:
        assert (weights[0][key] == weights[1][key]).all(), key


def test_generation_stops_at_the_templates_end_of_turn(models, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, GenerationConfig

    from generation import generation_kwargs as _generation_kwargs

    path = tmp_path / "m"
    shutil.copytree(models("qwen3"), path)
    tok = _tokenizer(path)
    endoftext, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    # A checkpoint whose generation config names only <|endoftext|> (as some chat models ship).
    GenerationConfig(eos_token_id=endoftext, pad_token_id=endoftext).save_pretrained(path)
    tok.eos_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.generation_config.eos_token_id == endoftext
    eos = _generation_kwargs(model, tok, _cfg())["eos_token_id"]
    assert endoftext in eos and im_end in eos
    assert end_of_turn_ids(tok) == [endoftext, im_end]


def test_target_ends_with_end_of_turn_when_pad_is_eos(models):
    tok = _tokenizer(models("qwen3"))
    tok.pad_token = tok.eos_token = "<|im_end|>"  # SmolLM2: pad_token = eos = <|im_end|>
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    enc = Encoder(tok, _cfg())
    out = enc(Example(prompt="问题", target="回答"))
    answer = [t for t in out["labels"] if t != -100]
    assert answer[-1] == im_end and tok.decode(answer[:-1]) == "回答"
    from data_processing import Collator

    batch = Collator(tok)([out, enc(Example(prompt="问题问题问题问题", target="回答回答"))])
    assert batch["labels"][0].tolist().count(im_end) == 1  # padding (same id) is not a label


def test_template_mismatch_warns_with_the_model_name(models, caplog):
    tok = _tokenizer(models("qwen3"))
    tok.chat_template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}Assistant:{% endif %}")
    with caplog.at_level(logging.WARNING):
        enc = Encoder(tok, _cfg(model_name_or_path="./my-odd-model"))
    assert "./my-odd-model" in caplog.text and "does not start with" in caplog.text
    out = enc(Example(prompt="q", target="a"))
    assert tok.decode([t for t in out["labels"] if t != -100]) == "a" + tok.eos_token


@pytest.mark.parametrize("on_cli", [False, True])
def test_evaluate_uses_the_trained_settings(models, tmp_path, caplog, on_cli):
    import main
    from model_config import adopt_training_settings

    trained = _cfg(system_prompt="trained prompt", output_dir=str(tmp_path), max_length=100,
                   model_name_or_path=str(models("qwen3")))
    trained.lora_dir.mkdir(parents=True)
    trained.save(trained.lora_dir / "run_config.yaml")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"model_name_or_path: {models('qwen3')}\noutput_dir: {tmp_path}\n"
                         "system_prompt: changed prompt\nmax_length: 100\n", encoding="utf-8")
    argv = ["--task", "evaluate", "--config", str(yaml_file)] + (["--system_prompt", "cli prompt"] if on_cli else [])
    cfg = main.parse(argv)
    with caplog.at_level(logging.WARNING):
        adopt_training_settings(cfg)
    assert "`system_prompt`" in caplog.text and "trained prompt" in caplog.text
    assert cfg.system_prompt == ("cli prompt" if on_cli else "trained prompt")
    assert "max_length" not in caplog.text  # equal values: no warning


def test_vlm_inference_uses_the_trained_prompt_and_label_map(tmp_path, caplog):
    import json

    from model_config import adopt_training_settings, save_training_settings

    trained_map = {"positions": [{"field": "leak", "map": {"0": "no", "1": "yes"}}], "defaults": {}}
    (tmp_path / "lm.json").write_text(json.dumps(trained_map), encoding="utf-8")
    (tmp_path / "prompt.txt").write_text("Inspect the pipe.", encoding="utf-8")
    base = {"model_type": "vlm", "output_dir": str(tmp_path / "o"), "model_name_or_path": str(tmp_path / "m")}
    cfg = build_config({**base, "label_map_file": str(tmp_path / "lm.json"),
                        "prompt_file": str(tmp_path / "prompt.txt")}, "t")
    cfg.lora_dir.mkdir(parents=True)
    save_training_settings(cfg, cfg.lora_dir)
    # Later: the label map file is gone and the prompt was edited.
    (tmp_path / "lm.json").unlink()
    (tmp_path / "prompt.txt").write_text("Something else.", encoding="utf-8")
    later = build_config({**base, "label_map_file": str(tmp_path / "lm.json"),
                          "prompt_file": str(tmp_path / "prompt.txt")}, "t")
    with caplog.at_level(logging.WARNING):
        adopt_training_settings(later)
    assert later.label_map_file == str(later.lora_dir / "label_map.json")
    assert later.prompt_file == str(later.lora_dir / "prompt.json")
    assert "differs from (or lacks) the file the adapter was trained with" in caplog.text
