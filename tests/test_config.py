"""Config: precedence, conversion, validation with all problems in one message."""

import pytest

from config import Config, UserError, build_config
from conftest import ROOT, run_main
from main import parse


def test_precedence_defaults_file_cli(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora_r: 4\nlearning_rate: 5e-4\nnum_train_epochs: 2\n")
    cfg = parse(["--task", "train", "--config", str(cfg_file), "--lora_r", "32"])
    assert cfg.lora_r == 32                   # CLI beats file
    assert cfg.learning_rate == 5e-4          # file beats default ("5e-4" is a string in YAML 1.1)
    assert cfg.num_train_epochs == 2.0
    assert cfg.lora_alpha == Config().lora_alpha  # default where neither sets it


def test_lists_bools_and_null_from_cli(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train_quantization_bit: 4\n")
    cfg = parse(["--task", "inference", "--config", str(cfg_file), "--target_modules", "q_proj,k_proj, v_proj",
                 "--use_original_model", "--train_quantization_bit", "null", "--group_by_length", "false"])
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.use_original_model is True
    assert cfg.train_quantization_bit is None
    assert cfg.group_by_length == "false"


def test_every_key_has_a_flag():
    import argparse

    from config import FIELDS, add_flags

    parser = argparse.ArgumentParser()
    add_flags(parser)
    flags = {a.dest for a in parser._actions}
    assert set(FIELDS) - {"task", "trainer_args", "lora_args"} <= flags  # *_args: their fields are the flags


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(UserError) as e:
        build_config({"lora_rank": 8, "learning_rat": 1e-4}, "x.yaml")
    msg = str(e.value)
    assert "did you mean `lora_r`" in msg and "did you mean `learning_rate`" in msg


def test_all_problems_listed_together():
    with pytest.raises(UserError) as e:
        build_config({"lora_r": 0, "learning_rate": -1, "lora_dropout": 1.0, "temperature": -0.1, "top_p": 0},
                     "x.yaml")
    msg = str(e.value)
    for key in ("lora_r", "learning_rate", "lora_dropout", "temperature", "top_p"):
        assert f"`{key}`" in msg


@pytest.mark.parametrize("raw,fragment", [
    ({"lora_r": "eight"}, "expected a whole number"),
    ({"train_quantization_bit": 3}, "use one of: 4, 8, null"),
    ({"inference_quantization_bit": "4bit"}, "inference_quantization_bit"),
    ({"dtype": "fp16"}, "use one of: auto, float32, float16, bfloat16"),
    ({"device": "gpu"}, "use auto, cpu, cuda or cuda:N"),
    ({"model_type": "vision"}, "use one of: llm, vlm"),
    ({"use_original_model": "maybe"}, "expected true or false"),
    ({"early_stopping_patience": 2, "load_best_model_at_end": False}, "drop load_best_model_at_end: false"),
])
def test_bad_values(raw, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        build_config(raw, "x.yaml")


def test_early_stopping_on_the_command_line_outranks_the_files_load_best_false():
    file = {"load_best_model_at_end": False}                 # the demo config keeps the last epoch
    cfg = build_config(file, "demo.yaml", {"early_stopping_patience": "2"})
    assert cfg.trainer_args["load_best_model_at_end"] is True
    with pytest.raises(UserError, match="drop load_best_model_at_end: false"):   # both on one layer: a clash
        build_config(file, "demo.yaml", {"early_stopping_patience": "2", "load_best_model_at_end": "false"})


def test_cli_errors_exit_2_without_traceback(capsys):
    assert run_main("--task", "train", "--config", "configs/demo_llm.yaml", "--lora_rank", "8") == 2
    err = capsys.readouterr().err
    assert "--lora_rank" in err and "did you mean `lora_r`" in err and "Traceback" not in err


def test_missing_config_file_and_no_task(tmp_path, capsys):
    assert run_main("--task", "train", "--config", str(tmp_path / "nope.yaml")) == 2
    assert "nope.yaml not found" in capsys.readouterr().err
    assert run_main("--config", "configs/demo_llm.yaml") == 2
    assert "no task given" in capsys.readouterr().err


def test_invalid_yaml_reports_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: 8\nlora_alpha: [16\n")
    assert run_main("--task", "train", "--config", str(bad)) == 2
    assert "invalid YAML at line" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    for path in ("config.yaml", "configs/demo.yaml", "configs/demo_llm.yaml", "configs/demo_vlm.yaml"):
        parse(["--task", "train", "--config", path])


def test_every_key_is_documented_in_config_yaml_and_both_readmes():
    import yaml

    from config import FIELDS

    keys = set(FIELDS) - {"task"}
    assert set(yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))) == keys
    for readme in ("README.md", "README_zh.md"):
        text = (ROOT / readme).read_text(encoding="utf-8")
        missing = [k for k in keys if f"| `{k}` |" not in text]
        assert not missing, f"{readme} does not document {missing}"


def test_resolved_config_round_trips(tmp_path):
    import yaml

    cfg = build_config({"lora_r": 4, "target_modules": ["c_attn"]}, "x.yaml")
    cfg.save(tmp_path / "run.yaml")
    again = build_config(yaml.safe_load((tmp_path / "run.yaml").read_text()), "run.yaml")
    assert again == cfg


def test_output_dir_may_not_be_the_model_folder(tmp_path):
    with pytest.raises(UserError, match="the model folder itself"):
        build_config({"model_name_or_path": str(tmp_path / "Qwen3-1.7B"), "output_dir": str(tmp_path)}, "x.yaml")


def test_trainer_option_check_stays_outside_the_process_group(monkeypatch):
    """The TrainingArguments check at start-up runs as one plain process: under a launcher's environment it
    neither joins the process group nor leaves accelerate's state set up for the run's own arguments."""
    import os

    from accelerate.state import PartialState

    launcher = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "ACCELERATE_USE_DEEPSPEED": "true"}
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)   # joining a group would fail on it
    cfg = build_config({"max_steps": 3, "load_best_model_at_end": False}, "test")
    assert cfg.trainer_args == {"max_steps": 3, "load_best_model_at_end": False}
    assert {k: os.environ[k] for k in launcher} == launcher
    assert PartialState._shared_state == {}


# --- library surfaces: TrainingArguments and LoraConfig keys are the library's own fields ----------------------

def test_library_keys_take_type_help_and_choices_from_the_library():
    import dataclasses

    from peft import LoraConfig
    from transformers import TrainingArguments

    from config import FIELDS, flag_help, library_default, library_field

    library = {k: f for k, f in FIELDS.items() if f.metadata["library"]}
    assert {"learning_rate", "lr_scheduler_type", "save_strategy", "lora_r", "lora_alpha"} <= set(library)
    owners = {"TrainingArguments": TrainingArguments, "LoraConfig": LoraConfig}
    for key, f in library.items():
        owner = owners[f.metadata["library"]]
        found, _ = library_field(key)
        assert found is {x.name: x for x in dataclasses.fields(owner)}[f.metadata["library_name"] or key]
        # A default of our own states why; one without a reason is the library's.
        if not f.metadata["why"]:
            assert f.default == library_default(key), key
        assert found.metadata["help"][:40] in flag_help(key, True), key
    # The scheduler takes every schedule transformers has, not four.
    cfg = build_config({"lr_scheduler_type": "cosine_with_restarts"}, "x.yaml")
    assert cfg.lr_scheduler_type == "cosine_with_restarts"
    with pytest.raises(UserError) as e:
        build_config({"lr_scheduler_type": "cosinus"}, "x.yaml")
    assert "inverse_sqrt" in str(e.value) and "warmup_stable_decay" in str(e.value)


def test_a_library_value_left_out_says_why():
    with pytest.raises(UserError) as e:
        build_config({"save_strategy": "best"}, "x.yaml")
    assert "resuming would restart from an old one" in str(e.value) and "use one of: no, steps, epoch" in str(e.value)


def test_library_keys_converted_from_the_command_line(tmp_path):
    cfg = parse(["--task", "train", "--learning_rate", "5e-4", "--save_total_limit", "null", "--torch_compile",
                 "false", "--lora_r", "4"])
    assert (cfg.learning_rate, cfg.save_total_limit, cfg.torch_compile, cfg.lora_r) == (5e-4, None, False, 4)
    with pytest.raises(UserError, match="`per_device_train_batch_size`"):
        build_config({"per_device_train_batch_size": "two"}, "x.yaml")


def test_lora_fields_pass_through_and_are_checked():
    cfg = build_config({"use_rslora": True, "init_lora_weights": "gaussian"}, "x.yaml")
    assert cfg.lora_args == {"use_rslora": True, "init_lora_weights": "gaussian"}
    assert "use_rslora" not in cfg.trainer_args
    with pytest.raises(UserError) as e:
        build_config({"use_dora": "yes", "r": 4, "task_type": "SEQ_CLS", "init_lora_weights": "gauss"}, "x.yaml")
    msg = str(e.value)
    assert "`use_dora` = 'yes': LoraConfig expects bool" in msg
    assert "`r`: use lora_r" in msg and "`task_type`: set by this tool" in msg
    with pytest.raises(UserError, match="LoraConfig rejected `layers_pattern`: When `layers_pattern` is specified"):
        build_config({"layers_pattern": "layers"}, "x.yaml")


def test_lora_fields_reach_the_trained_adapter(models, tmp_path):
    import json

    from conftest import small_llm_data

    args = ["--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path", models("qwen3"), "--output_dir",
            tmp_path / "out", "--data_dir", small_llm_data(tmp_path / "data"), "--max_steps", "1",
            "--save_strategy", "no", "--eval_strategy", "no", "--use_rslora", "true", "--lora_r", "4",
            "--lr_scheduler_type", "cosine_with_restarts"]
    assert run_main("--task", "train", *args) == 0
    run_dir = next((tmp_path / "out").iterdir())
    adapter = json.loads((run_dir / "lora_model/adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and adapter["r"] == 4
    import yaml

    run_cfg = yaml.safe_load((run_dir / "lora_model/run_config.yaml").read_text(encoding="utf-8"))
    assert run_cfg["lora_args"] == {"use_rslora": True} and run_cfg["lr_scheduler_type"] == "cosine_with_restarts"


def test_help_shows_the_librarys_own_text(capsys):
    from main import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "The initial learning rate for" in out           # TrainingArguments' help for learning_rate
    assert "Lora attention dimension" in out                 # LoraConfig's help for r
