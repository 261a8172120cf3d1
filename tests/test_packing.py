"""Packing keeps samples apart: a packed batch gives each sample the loss and gradients it has alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from packing import keeps_samples_apart, packed_collator

LENGTHS = (5, 17, 9)


def _model(path, attn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def _samples(vocab):
    gen = torch.Generator().manual_seed(1)
    samples = []
    for n in LENGTHS:
        ids = torch.randint(5, vocab, (n,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return samples


def _token_losses(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


def _gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_unpacked(models, arch, attn):
    """Per-sample losses within 1e-4 and gradients within 1e-4 (float32; measured differences about 1e-5)."""
    model = _model(models(arch), attn)
    samples = _samples(model.config.vocab_size)
    alone = [_token_losses(model(input_ids=torch.tensor([s["input_ids"]])).logits[0], torch.tensor(s["labels"]))
             for s in samples]
    reference = _gradients(model, sum(alone))
    batch = packed_collator()(samples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    ends = torch.tensor(LENGTHS).cumsum(0).tolist()
    packed = [_token_losses(logits[start:end], batch["labels"][0, start:end])
              for start, end in zip([0] + ends[:-1], ends)]
    for one, together in zip(alone, packed):
        assert abs(one.item() - together.item()) < 1e-4
    assert (reference - _gradients(model, sum(packed))).abs().max().item() < 1e-4


def test_isolation_check_tells_models_apart(models):
    """Qwen3 masks by restarting position ids; OPT builds its mask without them and would leak across samples."""
    isolated, ratio = keeps_samples_apart(_model(models("qwen3"), "sdpa"))
    assert isolated and ratio < 1e-3
    isolated, ratio = keeps_samples_apart(_model(models("opt"), "sdpa"))
    assert not isolated and ratio > 0.5


def test_auto_packs_where_the_check_passes_unless_grouping_is_asked_for(models, caplog):
    """`auto` (the default) packs where the model keeps samples apart, yields to an explicit
    `group_by_length: true`, and pads where the model would leak (OPT)."""
    from config import build_config
    from train import _use_packing

    cfg = build_config({}, "test")
    assert cfg.packing == "auto"
    assert _use_packing(cfg, _model(models("qwen3"), "sdpa")) is True
    with caplog.at_level("INFO"):
        assert _use_packing(build_config({"group_by_length": "true"}, "test"), _model(models("qwen3"), "sdpa")) \
            is False
        assert _use_packing(cfg, _model(models("opt"), "sdpa")) is False
    assert "asks for length-grouped padded batches" in caplog.text
    assert "does not keep packed samples apart: padded batches" in caplog.text
    forced = build_config({"group_by_length": "true", "packing": "true"}, "test")
    assert _use_packing(forced, _model(models("qwen3"), "sdpa")) is True
