"""Packing keeps samples apart: a packed batch gives each sample the loss and gradients it has alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from packing import PackedCollator, keeps_samples_apart, rope_positions_for_packed_rows

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


def _per_sample_losses(logits, labels, lengths):
    """A packed row's logits (tokens, vocab) and labels (tokens,) cut back into each sample's summed loss."""
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return [_token_losses(logits[a:b], labels[a:b]) for a, b in zip([0] + ends[:-1], ends)]


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
    batch = PackedCollator()(samples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    packed = _per_sample_losses(logits, batch["labels"][0], LENGTHS)
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


def _vlm(models, tmp_path, **keys):
    """The tiny Qwen3-VL as training loads it, and three samples whose images differ in size (4, 6, 8 tokens)."""
    import json

    import numpy as np
    from PIL import Image

    from config import build_config
    from data_loading import Example
    from data_processing import Encoder
    from model_config import load_base

    cfg = build_config({"model_type": "vlm", "model_name_or_path": str(models("qwen3_vl")), "dtype": "float32",
                        "output_dir": str(tmp_path / "out"), "image_min_pixels": 4096, "image_max_pixels": 16384,
                        **keys}, "test")  # keys override (the FlashAttention-2 test asks for bfloat16 on cuda)
    torch.manual_seed(0)
    model, processor = load_base(cfg, "train")
    rng = np.random.default_rng(0)
    examples = []
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 128)]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        examples.append(Example(prompt="What is in the image?", target=json.dumps({"n": i}), image=str(path)))
    return cfg, model.eval(), processor, [Encoder(processor, cfg)(e) for e in examples]


def test_packed_vlm_batch_equals_unpacked(models, tmp_path):
    """A packed row of three images of different sizes gives each sample its own loss and gradients (within 1e-4;
    measured about 1e-5): the text positions keep the samples apart, and each sample's multimodal rope positions
    are the ones it has alone. Without them (the row's positions for every rope axis) the losses move."""
    from data_processing import Collator

    cfg, model, processor, samples = _vlm(models, tmp_path)
    alone = []
    for s in samples:
        batch = Collator(processor)([s])
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone.append(_token_losses(logits, batch["labels"][0]))
    reference = _gradients(model, sum(alone))

    assert rope_positions_for_packed_rows(model)
    batch = PackedCollator(multimodal=True)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (1, sum(lengths)) and batch["pixel_values"].shape[0] == sum(
        int(s["image_grid_thw"].prod()) for s in samples)

    def per_sample(batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        return _per_sample_losses(logits, batch["labels"][0], lengths)

    packed = per_sample(batch)
    for one, together in zip(alone, packed):
        assert abs(one.item() - together.item()) < 1e-4
    assert (reference - _gradients(model, sum(packed))).abs().max().item() < 1e-4

    seen = {}
    body = model.model
    hook = body.register_forward_pre_hook(lambda m, a, kw: seen.update(pos=kw["position_ids"]), with_kwargs=True)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    hook.remove()
    own = [body.get_rope_index(torch.tensor([s["input_ids"]]), s["mm_token_type_ids"][None],
                               image_grid_thw=s["image_grid_thw"])[0] for s in samples]
    assert torch.equal(seen["pos"][1:], torch.cat(own, dim=2))  # rope axes: each sample's own, exactly
    assert torch.equal(seen["pos"][0], batch["position_ids"])   # text axis: restarting per sample

    without = dict(batch)
    del without["packed_samples"]
    with torch.no_grad():
        moved = [abs(a.item() - b.item()) for a, b in zip(alone, per_sample(without))]
    assert max(moved) > 1e-3


def test_vlm_packs_only_with_multimodal_rope_positions(models, tmp_path):
    """A VLM packs where its body numbers rope positions per image grid (Qwen3-VL); `packing: true` on a model
    without them is refused by name; `auto` on SDPA pads (no faster packed there), `false` never packs."""
    from config import UserError, build_config
    from train import _use_packing

    cfg, model, _, _ = _vlm(models, tmp_path, packing="true")
    assert _use_packing(cfg, model) is True
    text = _model(models("qwen3"), "sdpa")
    with pytest.raises(UserError, match="Qwen3ForCausalLM has no multimodal rope positions"):
        _use_packing(build_config({"model_type": "vlm", "packing": "true"}, "test"), text)
    assert _use_packing(build_config({"model_type": "vlm", "packing": "auto"}, "test"), text) is False
    assert _use_packing(build_config({"model_type": "vlm", "packing": "false"}, "test"), model) is False
    assert _use_packing(build_config({"model_type": "vlm", "packing": "auto"}, "test"), model) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_vl"])
def test_packed_batch_equals_unpacked_on_flash_attention_2(models, tmp_path, arch):
    """FlashAttention-2's varlen kernels cut a packed row where the text positions restart: per-sample losses
    equal the unpacked ones within bfloat16's rounding (2% relative)."""
    pytest.importorskip("flash_attn")
    from data_processing import Collator

    if arch == "qwen3":
        model = AutoModelForCausalLM.from_pretrained(models(arch), attn_implementation="flash_attention_2",
                                                     dtype=torch.bfloat16).cuda().eval()
        model.config.use_cache = False
        samples, collate = _samples(model.config.vocab_size), PackedCollator()
        singles = [{"input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]])}
                   for s in samples]
    else:
        _, model, processor, samples = _vlm(models, tmp_path, attn_implementation="flash_attention_2",
                                            dtype="bfloat16", device="cuda")
        assert rope_positions_for_packed_rows(model)
        collate = PackedCollator(multimodal=True)
        singles = [Collator(processor)([s]) for s in samples]
    device = next(model.parameters()).device
    with torch.no_grad():
        alone = [_token_losses(model(**{k: v.to(device) for k, v in b.items() if k != "labels"}).logits[0].float(),
                               b["labels"][0].to(device)) for b in singles]
        batch = collate(samples)
        logits = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                          if k != "labels"}).logits[0].float()
    packed = _per_sample_losses(logits, batch["labels"][0].to(device), [len(s["input_ids"]) for s in samples])
    for one, together in zip(alone, packed):
        assert together.item() == pytest.approx(one.item(), rel=2e-2)
