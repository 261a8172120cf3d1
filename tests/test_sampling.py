"""Training-set shaping: length-grouped batches in random order, and for VLMs class balancing over label codes and
seeded online augmentation (training only)."""

import logging
import shutil

import pytest
import torch

from config import UserError, build_config
from conftest import ROOT, run_main
from data_loading import Example
from data_processing import augmentation
from sampling import LengthGroupedSampler, balance, use_grouping

DEMO_VLM = str(ROOT / "configs" / "demo_vlm.yaml")


def _examples(counts):
    return [Example("", "{}", image=f"{code}_{i}.jpg") for code, n in counts.items() for i in range(n)]


def test_oversample_evens_the_codes(caplog):
    cfg = build_config({"model_type": "vlm", "balance": "oversample"}, "t")
    with caplog.at_level(logging.INFO):
        out, weights = balance(_examples({"000": 8, "131": 2, "142": 1}), cfg)
    codes = [e.image.split("_")[0] for e in out]
    assert weights is None and codes.count("000") == codes.count("131") == codes.count("142") == 8
    assert "before: 000: 8, 131: 2, 142: 1" in caplog.text and "after: 000: 8, 131: 8, 142: 8" in caplog.text
    assert balance(_examples({"000": 8, "131": 2, "142": 1}), cfg)[0] == out          # seeded


def test_weighted_draws_each_code_equally():
    cfg = build_config({"model_type": "vlm", "balance": "weighted"}, "t")
    examples = _examples({"000": 9, "131": 3})
    out, weights = balance(examples, cfg)
    assert out == examples and weights[0] == pytest.approx(1 / 9) and weights[-1] == pytest.approx(1 / 3)
    sampler = torch.utils.data.WeightedRandomSampler(weights, 12000, generator=torch.Generator().manual_seed(0))
    drawn = [examples[i].image[:3] for i in sampler]
    assert abs(drawn.count("131") / len(drawn) - 0.5) < 0.03


def test_balance_and_augmentation_are_vlm_only():
    with pytest.raises(UserError, match="balance: none for model_type llm"):
        balance(_examples({"0": 1}), build_config({"balance": "oversample"}, "t"))
    with pytest.raises(UserError, match=r"\['sharpen'\] unknown"):
        augmentation(build_config({"model_type": "vlm", "augmentation": ["sharpen"]}, "t"))


def test_augmentation_changes_training_images_only(models, tmp_path):
    from transformers import AutoProcessor

    from data_processing import Encoder

    processor = AutoProcessor.from_pretrained(models("qwen3_vl"))
    cfg = build_config({"model_type": "vlm", "augmentation": ["hflip", "color", "rotate"], "augmentation_p": 1.0,
                        "prompt_file": str(ROOT / "data/vlm/prompt.json"), "image_min_pixels": 4096,
                        "image_max_pixels": 16384}, "t")
    image = sorted((ROOT / "data/vlm/images").iterdir())[0]
    ex = Example("", '{"a": 1}', image=str(image))
    plain = Encoder(processor, cfg)
    augmented = Encoder(processor, cfg, augmentation(cfg))
    assert torch.equal(plain(ex)["pixel_values"], plain(ex)["pixel_values"])         # validation: untouched
    torch.manual_seed(0)
    first = augmented(ex)["pixel_values"]
    assert not torch.equal(first, plain(ex)["pixel_values"])
    torch.manual_seed(0)
    assert torch.equal(augmented(ex)["pixel_values"], first)                        # seeded
    assert augmented(ex)["labels"] == plain(ex)["labels"]                           # the target is unchanged


def test_vlm_training_with_balance_and_augmentation(models, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    src = sorted((ROOT / "data/vlm/images").iterdir())
    for i, name in enumerate([f"000_{i}.jpg" for i in range(6)] + ["131_0.jpg", "131_1.jpg"]):
        shutil.copy(src[i], folder / name)
    with caplog.at_level(logging.INFO):
        assert run_main("--task", "train", "--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"),
                        "--image_dir", folder, "--output_dir", tmp_path / "out", "--num_train_epochs", "1",
                        "--balance", "oversample", "--augmentation", "hflip,blur") == 0
    assert "before: 000: 5, 131: 1" in caplog.text and "after: 000: 5, 131: 5" in caplog.text
    assert "augmenting training images online (p=0.50 each): hflip" in caplog.text


def test_length_grouped_batches_are_similar_in_length_and_drawn_in_random_order():
    lengths = [int(10 * 1.05 ** i) for i in range(100)]  # 10 .. 1250 tokens
    sampler = LengthGroupedSampler(lengths, 4, seed=7)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))

    def spread(order):  # mean ratio longest / shortest within a batch
        batches = [order[k:k + 4] for k in range(0, 100, 4)]
        return sum(max(lengths[i] for i in b) / min(lengths[i] for i in b) for b in batches) / len(batches)

    random_spread = spread(torch.randperm(100).tolist())
    for order in epochs:
        assert sorted(order) == list(range(100))                       # every sample once
        batches = [order[k:k + 4] for k in range(0, 100, 4)]
        assert lengths[order[0]] == max(lengths)                      # the longest batch first: an OOM at step 1
        assert spread(order) < random_spread / 3
        # not a curriculum: the batches' lengths do not fall from first to last
        means = [sum(lengths[i] for i in b) for b in batches[1:]]
        assert sum(a > b for a, b in zip(means, means[1:])) < 0.75 * len(means)
    assert epochs[1] != epochs[2]                                       # a new order every epoch
    again = LengthGroupedSampler(lengths, 4, seed=7)
    again.set_epoch(2)
    torch.manual_seed(123)                                              # whatever the global generator holds
    assert list(again) == epochs[2]                                     # (seed, epoch) alone: resumable
    assert list(LengthGroupedSampler(lengths, 4, seed=8)) != epochs[0]


def test_length_grouped_sampler_keeps_a_short_last_batch_last():
    order = list(LengthGroupedSampler(list(range(1, 11)), 4, seed=1))     # 10 samples: 4 + 4 + 2
    assert sorted(order) == list(range(10))
    assert set(order[8:]) == {0, 1}      # one sorted window: the short batch holds the 2 shortest and comes last
    assert set(order[:4]) == {6, 7, 8, 9}                                # the longest batch first


def test_group_by_length_auto_groups_only_where_padding_costs(caplog):
    even = [70 + i % 20 for i in range(160)]                          # the SmolLM2 demo: 70-89 tokens
    wide = [int(20 * 1.03 ** i) for i in range(160)]                  # 20 .. 2300 tokens
    with caplog.at_level(logging.INFO):
        assert not use_grouping("auto", even, 4)
        assert "random batches of 4 would pad" in caplog.text and "random batches (grouping above 10%)" in caplog.text
        assert use_grouping("auto", wide, 4)
    assert use_grouping("true", even, 4) and not use_grouping("false", wide, 4)
    state = torch.random.get_rng_state()
    use_grouping("auto", wide, 4)
    assert torch.equal(state, torch.random.get_rng_state())              # the training's random stream is untouched
