"""Answer-only logits: the output layer runs only where the loss needs it, and the loss is the same."""

import json

import pytest
import torch

from config import build_config
from conftest import ROOT, run_main, small_llm_data
from data_files import Example
from data_processing import Collator, Encoder
from train import answer_only_loss

DEMO = str(ROOT / "configs" / "demo_llm.yaml")


def _batch(processor, cfg, examples):
    enc = Encoder(processor, cfg)
    return Collator(processor)([enc(e) for e in examples])


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_llm_loss_equals_the_full_computation(models, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models(arch))
    model = AutoModelForCausalLM.from_pretrained(models(arch)).eval()
    cfg = build_config({"max_length": 128}, "t")
    batch = _batch(tok, cfg, [Example("今天做什么？" * 6, "去公园散步。"), Example("问", "很长的回答" * 5)])
    with torch.no_grad():
        full = model(**batch).loss
        part, out = answer_only_loss(model, batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        part_sum, _ = answer_only_loss(model, batch, num_items_in_batch=torch.tensor(2 * n))
    assert part.item() == pytest.approx(full.item(), abs=1e-5)
    assert part_sum.item() == pytest.approx(full.item() / 2, abs=1e-5)        # normalised by the given count
    assert out.logits.shape[1] < batch["input_ids"].shape[1] - 1             # fewer positions than the full run


def test_vlm_loss_equals_the_full_computation(models, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(models("qwen3_vl"))
    model = AutoModelForImageTextToText.from_pretrained(models("qwen3_vl")).eval()
    cfg = build_config({"model_type": "vlm", "max_length": 512, "prompt_file": str(ROOT / "data/vlm/prompt.json"),
                        "image_min_pixels": 4096, "image_max_pixels": 16384}, "t")
    images = sorted((ROOT / "data/vlm/images").iterdir())[:2]
    batch = _batch(processor, cfg, [Example("", '{"status": "Leakage"}', image=str(images[0])),
                                     Example("", '{"status": "No Leakage", "x": 1}', image=str(images[1]))])
    with torch.no_grad():
        full = model(**batch).loss
        part, out = answer_only_loss(model, batch)
    assert part.item() == pytest.approx(full.item(), abs=1e-5)
    assert out.logits.shape[1] < 0.5 * batch["input_ids"].shape[1]          # image and prompt positions skipped


def test_training_with_and_without_gives_the_same_run(models, tmp_path):
    data = small_llm_data(tmp_path / "d", n_train=6, n_val=2)
    losses = {}
    for flag in ("true", "false"):
        assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3"), "--data_dir",
                        data, "--output_dir", tmp_path / flag, "--num_train_epochs", "2", "--save_strategy", "no",
                        "--answer_only_logits", flag, "--gradient_accumulation_steps", "2") == 0
        losses[flag] = json.loads((tmp_path / flag / "tiny-qwen3" / "train_results.json").read_text())
    assert losses["true"]["train_loss"] == pytest.approx(losses["false"]["train_loss"], rel=1e-4)
    assert losses["true"]["eval_loss"] == pytest.approx(losses["false"]["eval_loss"], rel=1e-4)
