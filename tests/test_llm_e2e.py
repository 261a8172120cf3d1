"""LLM end to end through main.py: the demo's memorisation, evaluate, REPL through a pipe, batch mode,
GPT-2 and OPT training, and the errors a user meets first."""

import json

import pytest

from conftest import ROOT, run_cli, run_main, small_llm_data, write_json

DEMO = str(ROOT / "configs" / "demo_llm.yaml")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The offline demo as a user runs it, with the model folder absent (it gets built) and outputs in tmp."""
    tmp = tmp_path_factory.mktemp("demo")
    args = ["--config", DEMO, "--model_name_or_path", tmp / "tiny-qwen3", "--output_dir", tmp / "out",
            "--data_dir", ROOT / "data" / "llm"]
    assert run_main("--task", "train", *args) == 0
    return tmp, args


def test_demo_trains_and_saves_outputs(demo_run):
    tmp, _ = demo_run
    run_dir = tmp / "out" / "tiny-qwen3"
    lora = run_dir / "lora_model"
    assert (tmp / "tiny-qwen3" / "config.json").is_file()          # built when absent
    assert (lora / "adapter_model.safetensors").is_file()
    assert (lora / "adapter_config.json").is_file() and (lora / "tokenizer_config.json").is_file()
    assert (lora / "run_config.yaml").is_file()
    assert (run_dir / "trainer_state.json").is_file()
    assert list(run_dir.glob("checkpoint-*"))                        # save_strategy: epoch, limit 1
    results = json.loads((run_dir / "train_results.json").read_text())
    assert results["global_step"] > 0 and results["peak_rss_mb"] > 0
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert any("eval_loss" in h for h in state["log_history"])       # evaluated per epoch


def test_demo_memorises_training_answers(demo_run, tmp_path):
    _, args = demo_run
    out = tmp_path / "preds.jsonl"
    assert run_main("--task", "inference", *args, "--input", ROOT / "data" / "llm" / "train.json",
                    "--output", out) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 15 and all({"text", "prediction", "target"} <= set(r) for r in rows)
    exact = sum(r["prediction"] == r["target"] for r in rows)
    assert exact >= 12, f"only {exact}/15 training answers reproduced"


def test_evaluate_writes_metrics(demo_run, caplog):
    tmp, args = demo_run
    run_dir = tmp / "out" / "tiny-qwen3"
    cached = sorted(p.name for p in (run_dir / "cache").iterdir())
    assert run_main("--task", "evaluate", *args) == 0
    # The loss pass reads the validation set training tokenised, and writes no cache of its own.
    assert "validation: using cached tokenisation" in caplog.text
    assert sorted(p.name for p in (run_dir / "cache").iterdir()) == cached
    res = json.loads((run_dir / "eval_results.json").read_text())
    for key in ("eval_loss", "perplexity", "num_samples", "exact_match", "rouge_l", "bleu"):
        assert key in res
    assert res["num_samples"] == 5
    assert res["rouge_l"] >= res["exact_match"] and res["rouge_l"] > 0   # an exact answer scores ROUGE-L 1
    preds = (run_dir / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(preds) == 5 and {"text", "target", "prediction"} <= set(json.loads(preds[0]))
    assert run_main("--task", "evaluate", *args, "--use_original_model") == 0
    base = json.loads((run_dir / "eval_results_original_model.json").read_text())
    assert base["adapter"] is None and base["eval_loss"] != res["eval_loss"]
    # One definition of validation loss: training's final number is evaluate's number for the same adapter.
    trained = json.loads((run_dir / "train_results.json").read_text())
    assert trained["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-4)
    assert trained["eval_perplexity"] == pytest.approx(res["perplexity"], rel=1e-4)


def test_repl_through_a_pipe(demo_run):
    _, args = demo_run
    question = json.loads((ROOT / "data/llm/train.json").read_text(encoding="utf-8"))[3]
    stdin = b"\n   \n" + question["text"].encode() + b"\n\xff\xfe bad bytes\n" + b"x" * 50 + b"\nquit\nnever read\n"
    proc = run_cli("--task", "inference", *args, "--max_input_chars", "20", "--max_new_tokens", "80", stdin=stdin)
    out = proc.stdout.decode("utf-8")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert question["target"] in out                      # streamed answer of the fine-tuned model
    assert "not valid UTF-8" in out                       # undecodable bytes: message, session goes on
    assert "truncated to max_input_chars=20" in out       # very long input: note
    assert out.count("> ") == 6                           # 2 empty lines ignored, stops at quit


def test_repl_ends_on_eof_with_original_model(demo_run):
    _, args = demo_run
    proc = run_cli("--task", "inference", *args, "--use_original_model", "--max_new_tokens", "5", stdin="你好\n")
    assert proc.returncode == 0 and "base model" in proc.stdout.decode()


def test_batch_txt_and_jsonl_inputs(demo_run, tmp_path):
    _, args = demo_run
    txt = tmp_path / "q.txt"
    txt.write_text("如何快速入睡？\n\n夏天怎样防止中暑？\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert run_main("--task", "inference", *args, "--input", txt, "--output", out) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == ["如何快速入睡？", "夏天怎样防止中暑？"] and "target" not in rows[0]
    bad = write_json(tmp_path / "bad.json", [{"question": "x"}])
    assert run_main("--task", "inference", *args, "--input", bad) == 2


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures_train_one_epoch(models, tmp_path, arch, caplog):
    data = small_llm_data(tmp_path / "data")
    args = ["--config", DEMO, "--model_name_or_path", models(arch), "--tiny_model", "null", "--data_dir", data,
            "--output_dir", tmp_path / "out", "--num_train_epochs", "1", "--target_modules", "q_proj,v_proj"]
    assert run_main("--task", "train", *args) == 0
    adapter = json.loads((tmp_path / "out" / f"tiny-{arch}" / "lora_model" / "adapter_config.json").read_text())
    expected = {"gpt2": {"c_attn"}, "opt": {"q_proj", "v_proj"}}[arch]
    assert set(adapter["target_modules"]) == expected
    assert run_main("--task", "inference", *args, "--input", data / "validation.json",
                    "--output", tmp_path / "p.jsonl", "--max_new_tokens", "8") == 0


def test_no_adapter_and_missing_model_errors(models, tmp_path, capsys):
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp_path]
    assert run_main("--task", "inference", *args) == 2
    assert "run `python main.py --task train` first" in capsys.readouterr().err
    assert run_main("--task", "train", "--config", DEMO, "--tiny_model", "null",
                    "--model_name_or_path", tmp_path / "Qwen3-1.7B") == 2
    assert "not found. Download it first" in capsys.readouterr().err


def test_wrong_target_module_lists_the_models_layers(models, tmp_path, capsys):
    data = small_llm_data(tmp_path / "data")
    assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3"), "--data_dir", data,
                    "--output_dir", tmp_path, "--target_modules", "qkv_projection") == 2
    err = capsys.readouterr().err
    assert "qkv_projection" in err and "q_proj" in err and "down_proj" in err


def test_packing_trains_where_the_model_keeps_samples_apart(models, tmp_path, caplog, capsys):
    """Packing runs on SDPA (CPU) where the measured check passes, and is refused where the model would let
    packed samples attend to each other (OPT builds its mask without position_ids)."""
    data = small_llm_data(tmp_path / "data")
    args = ["--config", DEMO, "--data_dir", data, "--output_dir", tmp_path, "--num_train_epochs", "1"]
    with caplog.at_level("INFO"):
        assert run_main("--task", "train", *args, "--model_name_or_path", models("qwen3"), "--packing") == 0
    assert "kept apart by sdpa attention" in caplog.text
    assert (tmp_path / "tiny-qwen3" / "lora_model" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert run_main("--task", "train", *args, "--model_name_or_path", models("opt"), "--packing", "true") == 2
    assert "OPTForCausalLM with sdpa attention lets packed samples attend to each other" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_liger_refused_on_cpu(models, tmp_path, capsys):
    assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir",
                    tmp_path, "--use_liger_kernel") == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_dataset_name_loads_through_datasets(models, tmp_path, capsys):
    """dataset_name goes through datasets.load_dataset (here a local folder, as a hub name would online)."""
    data = small_llm_data(tmp_path / "ds", n_train=4, n_val=2)
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp_path / "out",
            "--num_train_epochs", "1"]
    assert run_main("--task", "train", *args, "--dataset_name", data) == 0
    res = json.loads((tmp_path / "out" / "tiny-qwen3" / "train_results.json").read_text())
    assert res["num_train_samples"] == 4
    assert run_main("--task", "train", *args, "--dataset_name", "someone/no-such-dataset") == 2
    assert "could not load dataset 'someone/no-such-dataset'" in capsys.readouterr().err
