"""VLM training-set shaping: class balancing over label codes and seeded online augmentation (training only)."""

import logging
import shutil

import pytest
import torch

from config import UserError, build_config
from conftest import ROOT, run_main
from data_files import Example
from training_data import augmentation, balance

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
