"""Answer-only logits and fused linear cross-entropy: the output layer runs only where the loss needs it (or the
logits are never materialised), and the loss and its gradients are the same."""

import json

import pytest
import torch

import losses
from config import build_config
from conftest import ROOT, run_main, small_llm_data
from data_loading import Example
from data_processing import Collator, Encoder
from losses import _ChunkedLinearCrossEntropy, answer_only_loss, fused_answer_loss, fused_loss_backend

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
    for flag in ("true", "false"):   # answer-only logits through the model's own loss (not the fused path)
        assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3"), "--data_dir",
                        data, "--output_dir", tmp_path / flag, "--num_train_epochs", "2", "--save_strategy", "no",
                        "--answer_only_logits", flag, "--fused_loss", "off", "--gradient_accumulation_steps",
                        "2") == 0
        losses[flag] = json.loads((tmp_path / flag / "tiny-qwen3" / "train_results.json").read_text())
    assert losses["true"]["train_loss"] == pytest.approx(losses["false"]["train_loss"], rel=1e-4)
    assert losses["true"]["eval_loss"] == pytest.approx(losses["false"]["eval_loss"], rel=1e-4)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["qwen3", "gpt2", "qwen3_vl"])
def test_fused_loss_and_gradients_equal_the_full_computation(models, arch):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    if arch == "qwen3_vl":
        processor = AutoProcessor.from_pretrained(models(arch))
        model = AutoModelForImageTextToText.from_pretrained(models(arch))
        cfg = build_config({"model_type": "vlm", "max_length": 512, "image_min_pixels": 4096,
                            "image_max_pixels": 16384, "prompt_file": str(ROOT / "data/vlm/prompt.json")}, "t")
        images = sorted((ROOT / "data/vlm/images").iterdir())[:2]
        examples = [Example("", '{"status": "Leakage"}', image=str(images[0])),
                    Example("", '{"status": "No Leakage", "x": 1}', image=str(images[1]))]
    else:
        processor = AutoProcessor.from_pretrained(models(arch))
        model = AutoModelForCausalLM.from_pretrained(models(arch))
        cfg = build_config({"max_length": 128}, "t")
        examples = [Example("今天做什么？" * 6, "去公园散步。"), Example("问", "很长的回答" * 5)]
    batch = _batch(processor, cfg, examples)
    model.eval()  # no dropout: both passes compute the same function (gradients flow in eval mode too)
    for p in model.parameters():
        p.requires_grad_(True)  # gradients of every weight, the output layer's (tied embeddings) included
    assert fused_loss_backend(model, "auto", sharded=False) == "torch"
    full = model(**batch).loss
    full.backward()
    want = _grads(model)
    model.zero_grad()
    n = int((batch["labels"][:, 1:] != -100).sum())
    fused, out = fused_answer_loss(model, batch, "torch", num_items_in_batch=torch.tensor(n))
    fused.backward()
    got = _grads(model)
    assert fused.item() == pytest.approx(full.item(), abs=1e-5)
    assert out.logits.numel() == 0                                          # no logits were materialised
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_cross_entropy_matches_torch_in_several_chunks(monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (37,))
    monkeypatch.setattr(losses, "_CHUNK_BYTES", 4 * 50 * 8)                 # 8 rows a chunk: 5 chunks
    got = _ChunkedLinearCrossEntropy.apply(hidden, weight, target) * 0.5
    got.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction="sum") * 0.5
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gh, hidden.grad)
    torch.testing.assert_close(gw, weight.grad)


def test_fused_loss_is_not_used_where_it_would_be_wrong(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models("qwen3"))
    assert fused_loss_backend(model, "off", sharded=False) is None
    assert fused_loss_backend(model, "torch", sharded=True) is None         # FSDP/ZeRO-3 shard the weight
    model.config.final_logit_softcapping = 30.0                             # logits transformed after the layer
    assert fused_loss_backend(model, "torch", sharded=False) is None


def test_training_with_fused_loss_gives_the_same_run(models, tmp_path, caplog):
    data = small_llm_data(tmp_path / "d", n_train=6, n_val=2)
    results = {}
    for flag in ("torch", "off"):
        caplog.clear()
        assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3"), "--data_dir",
                        data, "--output_dir", tmp_path / flag, "--num_train_epochs", "2", "--save_strategy", "no",
                        "--fused_loss", flag, "--gradient_accumulation_steps", "2") == 0
        results[flag] = json.loads((tmp_path / flag / "tiny-qwen3" / "train_results.json").read_text())
        used = "fused linear cross-entropy (torch)" in caplog.text
        assert used == (flag == "torch")
    assert results["torch"]["train_loss"] == pytest.approx(results["off"]["train_loss"], rel=1e-4)
    assert results["torch"]["eval_loss"] == pytest.approx(results["off"]["eval_loss"], rel=1e-4)
