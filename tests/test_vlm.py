"""VLM: label-map decoding, the stratified split, image-token masking, and the demo end to end."""

import json
import shutil
from pathlib import Path

import pytest

from config import UserError, build_config
from conftest import ROOT, run_cli, run_main, write_json
from data_loading import decode_code, label_code, load_label_map, stratified_split, target_json, vlm_split
from data_processing import IGNORE_INDEX, Collator, Encoder
from structured import parse_json

DEMO = str(ROOT / "configs" / "demo_vlm.yaml")
LABEL_MAP = ROOT / "data" / "vlm" / "label_map.json"


def test_decode_positional_code_with_defaults_in_order():
    lm = load_label_map(LABEL_MAP)
    assert label_code(Path("130_20260103_x.jpg")) == "130"
    assert decode_code("130", lm) == {"status": "Leakage", "sub_type": "High Pressure", "is_night_mode": False}
    assert list(json.loads(target_json("141", lm))) == ["status", "sub_type", "is_night_mode", "confidence"]


def test_non_ascii_values_kept(tmp_path):
    lm_path = write_json(tmp_path / "lm.json", {"positions": [{"field": "状态", "map": {"0": "正常", "1": "泄漏"}}],
                                                "defaults": {"说明": "自动"}})
    assert target_json("1", load_label_map(lm_path)) == '{"状态": "泄漏", "说明": "自动"}'


@pytest.mark.parametrize("code,fragment", [("13", "has 2 characters, the label map has 3"),
                                           ("190", "'9' is not in the map of 'sub_type'")])
def test_bad_codes(code, fragment):
    with pytest.raises(ValueError, match=fragment):
        decode_code(code, load_label_map(LABEL_MAP))


@pytest.mark.parametrize("data,fragment", [
    ({"mapping_type": "positional"}, '"positions" must be a non-empty list'),
    ({"positions": [{"map": {"0": "a"}}]}, 'positions[0] needs a "field"'),
    ({"positions": [{"field": "x"}]}, 'positions[0] (x) needs a non-empty "map"'),
    ({"positions": [{"field": "x", "map": {"10": "a"}}]}, "single characters"),
    ({"mapping_type": "dictionary", "positions": []}, "not supported"),
])
def test_malformed_label_maps(tmp_path, data, fragment):
    with pytest.raises(UserError) as e:
        load_label_map(write_json(tmp_path / "lm.json", data))
    assert fragment in str(e.value)


def test_stratified_split_properties(caplog):
    files, codes = [], []
    for code, n in (("000", 10), ("130", 5), ("141", 2), ("021", 1)):
        for i in range(n):
            files.append(f"{code}_{i}.jpg")
            codes.append(code)
    train, val = stratified_split(files, codes, 0.2, seed=7)
    assert set(train) | set(val) == set(files) and not set(train) & set(val)
    val_codes = {f.split("_")[0] for f in val}
    assert val_codes == {"000", "130", "141"}                # every code with >= 2 images is validated
    assert "021" in caplog.text and "021_0.jpg" in train     # too few: training only, with a warning
    assert sum(f.startswith("000") for f in val) == 2         # 20% of 10
    assert stratified_split(files, codes, 0.2, seed=7) == (train, val)  # reproducible
    assert stratified_split(files, codes, 0.2, seed=8) != (train, val)


def _vlm_cfg(tmp_path, images, **kw):
    return build_config(dict(model_type="vlm", image_dir=str(images), label_map_file=str(LABEL_MAP),
                             prompt_file=str(ROOT / "data/vlm/prompt.json"), output_dir=str(tmp_path / "out"),
                             model_name_or_path=str(tmp_path / "m"), **kw), "test")


def _copy_images(tmp_path, names):
    folder = tmp_path / "images"
    folder.mkdir()
    src = sorted((ROOT / "data/vlm/images").iterdir())
    for i, name in enumerate(names):
        shutil.copy(src[i], folder / name)
    return folder


def test_bad_codes_listed_or_skipped(tmp_path, caplog):
    folder = _copy_images(tmp_path, ["000_a.jpg", "000_b.jpg", "99_c.jpg", "1x0_d.png"])
    with pytest.raises(UserError) as e:
        vlm_split(_vlm_cfg(tmp_path, folder), write=False)
    assert "2 label codes that do not fit" in str(e.value)
    assert "99_c.jpg" in str(e.value) and "1x0_d.png" in str(e.value) and "skip_invalid_images" in str(e.value)
    split = vlm_split(_vlm_cfg(tmp_path, folder, skip_invalid_images=True), write=False)
    assert len(split["train"]) + len(split["validation"]) == 2 and "skipping 2" in caplog.text


def test_corrupt_and_empty_image_folders(tmp_path):
    folder = _copy_images(tmp_path, ["000_a.jpg"])
    (folder / "010_broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="1 unreadable images"):
        vlm_split(_vlm_cfg(tmp_path, folder), write=False)
    (folder / "9_badcode.jpg").write_bytes((folder / "000_a.jpg").read_bytes())
    with pytest.raises(UserError) as e:  # both kinds of problem in one message, not one kind per run
        vlm_split(_vlm_cfg(tmp_path, folder), write=False)
    assert "1 unreadable images" in str(e.value) and "1 label codes that do not fit" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no images"):
        vlm_split(_vlm_cfg(tmp_path, empty), write=False)


def test_vlm_encoding_masks_everything_but_the_json(models, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(models("qwen3_vl"))
    folder = _copy_images(tmp_path, ["130_a.jpg", "000_b.jpg"])
    cfg = _vlm_cfg(tmp_path, folder, image_min_pixels=4096, image_max_pixels=16384)
    examples = vlm_split(cfg, write=False)
    ex = (examples["train"] + examples["validation"])[0]
    enc = Encoder(processor, cfg)(ex)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert enc["input_ids"].count(image_id) == 9                   # 96x96 -> 3x3 merged patches
    answer = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(answer) == ex.target + "<|im_end|>"
    batch = Collator(processor)([enc, Encoder(processor, cfg)(ex)])
    assert batch["pixel_values"].shape[0] == 2 * enc["pixel_values"].shape[0]
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6], [1, 6, 6]]
    short = build_config(dict(cfg.to_dict(), max_length=len(enc["input_ids"]) - 1), "test")
    with pytest.raises(UserError, match=r"image tokens included, never truncated\) and the answer"):
        Encoder(processor, short)(ex)                               # never a cut JSON answer


def test_log_states_image_tokens_and_the_lengths_memory_follows(models, tmp_path, caplog):
    """Before training: image tokens per image, the longest sample, and what a batch of it costs in language-model
    tokens and vision-tower patches (Qwen3-VL: 4 patches per image token)."""
    from data_processing import build_dataset
    from model_config import load_processor

    folder = _copy_images(tmp_path, ["130_a.jpg", "000_b.jpg", "041_c.jpg"])
    cfg = _vlm_cfg(tmp_path, folder, image_min_pixels=128 * 128, image_max_pixels=128 * 128,
                   per_device_train_batch_size=3)
    processor = load_processor(cfg, models("qwen3_vl"), "train")
    examples = vlm_split(cfg, write=False)
    with caplog.at_level("INFO"):
        ds = build_dataset(Encoder(processor, cfg), examples["train"] + examples["validation"], None, "train")
    longest = max(len(ds[i]["input_ids"]) for i in range(len(ds)))
    assert "3 images, 16 to 16 image tokens each" in caplog.text
    assert f"the longest sample is {longest} tokens, so a batch of 3 runs up to {3 * longest} tokens" in caplog.text
    assert "up to 192 patches through the vision tower" in caplog.text


def test_every_processor_output_reaches_the_model(models, tmp_path):
    """Processors of other VLM families return more than pixel_values/image_grid_thw (LLaVA-Next image_sizes,
    Idefics pixel_attention_mask, Gemma 3 token_type_ids): the encoder and collator carry all of them."""
    import torch
    from transformers import AutoProcessor

    real = AutoProcessor.from_pretrained(models("qwen3_vl"))

    class OtherFamily:  # the real processor, plus the extra outputs other families return
        tokenizer, chat_template = real.tokenizer, real.chat_template

        def apply_chat_template(self, *a, **kw):
            return real.apply_chat_template(*a, **kw)

        def __call__(self, **kw):
            out = real(**kw)
            n = out["input_ids"].shape[1]
            out["token_type_ids"] = torch.ones(1, n, dtype=torch.long)
            out["image_sizes"] = torch.tensor([[96, 96]])
            out["pixel_attention_mask"] = torch.ones(1, 2, 4, 4, dtype=torch.bool)
            return out

    folder = _copy_images(tmp_path, ["130_a.jpg", "000_b.jpg"])
    cfg = _vlm_cfg(tmp_path, folder, image_min_pixels=4096, image_max_pixels=16384)
    examples = vlm_split(cfg, write=False)
    encoder = Encoder(OtherFamily(), cfg)
    a, b = (encoder(e) for e in examples["train"] + examples["validation"])
    assert len(a["token_type_ids"]) == len(a["input_ids"])          # extended over the answer
    batch = Collator(real)([a, b])
    width = batch["input_ids"].shape[1]
    assert batch["token_type_ids"].shape == (2, width)
    assert batch["image_sizes"].tolist() == [[96, 96], [96, 96]]
    assert batch["pixel_attention_mask"].shape == (2, 2, 4, 4)
    assert batch["image_grid_thw"].shape == (2, 3)


def test_max_eval_samples_takes_every_code():
    from data_loading import Example, stratified_subset

    examples = [Example("", "{}", image=f"{code}_{i}.jpg") for code in ("000", "131", "142") for i in range(10)]
    subset = stratified_subset(examples, 6, seed=1)
    codes = [e.image.split("_")[0] for e in subset]
    assert sorted(codes) == ["000", "000", "131", "131", "142", "142"]   # not the first six files (all 000)
    assert stratified_subset(examples, 6, seed=1) == subset and stratified_subset(examples, 6, seed=2) != subset


def test_parse_json_tolerates_fences_and_text():
    assert parse_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json('Result: {"a": {"b": 2}} done') == {"a": {"b": 2}}
    assert parse_json("no json {here") is None


@pytest.fixture(scope="module")
def vlm_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vlm")
    args = ["--config", DEMO, "--model_name_or_path", tmp / "tiny-qwen3-vl", "--output_dir", tmp / "out",
            "--image_dir", ROOT / "data/vlm/images"]
    assert run_main("--task", "train", *args) == 0
    return tmp, args


def test_vlm_demo_learns(vlm_demo):
    tmp, args = vlm_demo
    run_dir = tmp / "out" / "tiny-qwen3-vl"
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) == 50 and len(split["validation"]) == 10
    assert not set(split["train"]) & set(split["validation"])
    assert (run_dir / "lora_model" / "processor_config.json").is_file()
    assert run_main("--task", "evaluate", *args) == 0
    res = json.loads((run_dir / "eval_results.json").read_text())
    assert res["num_samples"] == 10 and res["json_valid_rate"] >= 0.9
    fields = res["fields"]
    assert set(fields) == {"status", "sub_type", "is_night_mode"}
    assert any(m["accuracy"] > m["majority_baseline"] for m in fields.values()), fields
    for m in fields.values():
        assert len(m["confusion_matrix"]) == len(m["labels"]) and {"accuracy", "macro_f1", "per_class"} <= set(m)
    assert (run_dir / "confusion_status.png").stat().st_size > 1000
    preds = [json.loads(x) for x in (run_dir / "eval_predictions.jsonl").read_text().splitlines()]
    assert {"file", "target", "prediction", "raw"} <= set(preds[0])  # the batch keys, plus target
    assert {p["file"] for p in preds} == set(split["validation"])     # evaluate reuses the saved split


def test_vlm_repl_bad_then_good_path(vlm_demo, tmp_path):
    _, args = vlm_demo
    broken = tmp_path / "000_broken.jpg"
    broken.write_bytes(b"\x00garbage")
    good = sorted((ROOT / "data/vlm/images").glob("131_*"))[0]
    stdin = f"'{tmp_path}/missing.jpg'\n{broken}\n\"{good}\"\nquit\n"
    proc = run_cli("--task", "inference", *args, stdin=stdin)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "image not found" in out and "cannot read image" in out
    reply = out.split("cannot read image")[1]
    assert parse_json(reply) is not None and "is_night_mode" in parse_json(reply)


def test_vlm_folder_batch(vlm_demo, tmp_path, monkeypatch):
    import generation

    _, args = vlm_demo
    out = tmp_path / "preds.jsonl"
    decoded = []
    real = generation.load_image
    monkeypatch.setattr(generation, "load_image", lambda path: decoded.append(path) or real(path))
    assert run_main("--task", "inference", *args, "--input", ROOT / "data/vlm/images", "--output", out) == 0
    assert len(decoded) == len(set(decoded)) == 60       # each image decoded once, for the answer and its confidence
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 60 and {"file", "prediction", "raw"} <= set(rows[0])
    assert sum(isinstance(r["prediction"], dict) for r in rows) >= 54


def test_unfrozen_vision_tower_is_trained_and_saved(models, tmp_path):
    import torch
    from safetensors import safe_open

    args = ["--config", DEMO, "--model_name_or_path", models("qwen3_vl"), "--output_dir", tmp_path,
            "--image_dir", ROOT / "data/vlm/images", "--num_train_epochs", "1", "--freeze_vision_tower", "false"]
    assert run_main("--task", "train", *args) == 0
    adapter = tmp_path / "tiny-qwen3_vl" / "lora_model" / "adapter_model.safetensors"
    with safe_open(adapter, "pt") as f:
        keys = list(f.keys())
        visual = [k for k in keys if ".visual." in k and "lora_" not in k]
        assert visual and all("lora_" in k for k in keys if "language_model" in k)
        trained = f.get_tensor(next(k for k in visual if k.endswith("patch_embed.proj.weight")))
    from safetensors.torch import load_file

    base = load_file(models("qwen3_vl") / "model.safetensors")["model.visual.patch_embed.proj.weight"]
    assert not torch.equal(trained.to(base.dtype), base)         # the tower moved, and was saved
    assert "vision_tower_runs" not in json.loads((tmp_path / "tiny-qwen3_vl" / "train_results.json").read_text())
    assert run_main("--task", "inference", *args, "--input", ROOT / "data/vlm/images", "--output",
                    tmp_path / "p.jsonl", "--max_new_tokens", "4") == 0


def test_frozen_tower_runs_once_per_image_and_trains_the_same(models, tmp_path, monkeypatch):
    """With the vision tower frozen its output per image is kept from the first epoch: later epochs neither run the
    tower nor decode the image, and training ends with the same loss and adapter as without the cache."""
    import torch
    from safetensors.torch import load_file

    import data_processing

    decoded = []
    real = data_processing.load_image
    monkeypatch.setattr(data_processing, "load_image", lambda path: decoded.append(path) or real(path))
    folder = _copy_images(tmp_path, [f"{c}_{i}.jpg" for i, c in enumerate(["000", "130", "141"] * 4)])
    runs = {}
    for mb in ("4096", "0"):
        out = tmp_path / f"out-{mb}"
        decoded.clear()
        assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3_vl"),
                        "--image_dir", folder, "--output_dir", out, "--num_train_epochs", "3", "--eval_strategy",
                        "epoch", "--save_strategy", "no", "--vision_cache_mb", mb) == 0
        run = out / "tiny-qwen3_vl"
        split = json.loads((run / "split.json").read_text())
        runs[mb] = (json.loads((run / "train_results.json").read_text()), list(decoded),
                    load_file(run / "lora_model" / "adapter_model.safetensors"), split)
    (cached, cached_decodes, cached_adapter, split), (plain, plain_decodes, plain_adapter, _) = runs["4096"], runs["0"]
    images = len(split["train"]) + len(split["validation"])
    assert cached["vision_tower_runs"] == images                 # once per image: training and validation
    # reused: epochs 2 and 3; the validation images at the 2nd and 3rd evaluation and the final validation loss
    assert cached["vision_features_reused"] == 2 * len(split["train"]) + 3 * len(split["validation"])
    assert "vision_tower_runs" not in plain
    assert len(cached_decodes) < len(plain_decodes) and len(set(cached_decodes)) == images
    assert sum(p.endswith(split["train"][0]) for p in cached_decodes) <= 2  # its first draw (and the length check)
    assert cached["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-5)
    assert cached_adapter.keys() == plain_adapter.keys()
    for key in cached_adapter:
        assert torch.allclose(cached_adapter[key], plain_adapter[key], atol=1e-5), key


def test_feature_cache_keeps_to_its_budget_and_reaches_workers_empty():
    """Entries past vision_cache_mb are not kept (those images run the tower each time); a loader worker started by
    spawn unpickles an empty cache, so its samples keep their pixels."""
    import pickle

    import torch

    from vision_tower import FeatureCache

    cache = FeatureCache(1)
    part = torch.ones(150 * 1024)                      # 600 KB of float32
    cache.put(1, [part])
    cache.put(2, [part])                               # over the 1 MB budget: left out
    assert 1 in cache and 2 not in cache and cache.used <= 2**20
    assert torch.equal(cache.entries[1][0], part)
    clone = pickle.loads(pickle.dumps(cache))
    assert 1 not in clone and clone.budget == cache.budget


def test_pixel_demo_reads_shapes_from_the_pixels(tmp_path):
    """configs/demo_vlm_shapes.yaml: with its vision tower trained, the tiny model names a shape that neither colour
    nor brightness tells (equal areas, colours drawn alike) on held-out images, far above the 1/3 of chance."""
    config = ROOT / "configs/demo_vlm_shapes.yaml"
    args = ["--config", config, "--model_name_or_path", tmp_path / "tiny-qwen3-vl-shapes", "--output_dir",
            tmp_path / "out"]
    # As the README gives these commands, a subprocess each (tests/test_readme_commands.py relies on this test).
    proc = run_cli("--task", "train", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    run_dir = tmp_path / "out" / "tiny-qwen3-vl-shapes"
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["validation"]) == 30 and not set(split["train"]) & set(split["validation"])
    proc = run_cli("--task", "evaluate", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    shape = json.loads((run_dir / "eval_results.json").read_text())["fields"]["shape"]
    assert shape["majority_baseline"] == pytest.approx(1 / 3, abs=0.01)
    # 18 of 30 or more by guessing has a chance under 1e-3; the demo measures 23 of 30.
    assert shape["accuracy"] >= 0.6, shape


def test_vlm_images_load_in_worker_processes_on_a_gpu_only():
    """VLM samples are decoded when drawn: on a GPU two loader processes overlap that with the step; on a CPU, or
    with few cores, the main process loads them (workers would take the model's cores); text never needs them."""
    from train import loader_workers

    assert loader_workers("vlm", on_gpu=True, cpus=16) == 2
    assert loader_workers("vlm", on_gpu=True, cpus=2) == 0
    assert loader_workers("vlm", on_gpu=False, cpus=16) == 0
    assert loader_workers("llm", on_gpu=True, cpus=16) == 0


def test_loader_workers_persist_only_where_there_are_workers(tmp_path):
    """Workers are kept across epochs when there are any (set by the user here); with none, the option is off, as
    the DataLoader requires."""
    from train import _training_arguments

    base = dict(model_type="vlm", output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "m"),
                device="cpu")
    assert _training_arguments(build_config(base, "test")).dataloader_persistent_workers is False
    args = _training_arguments(build_config(dict(base, dataloader_num_workers=2), "test"))
    assert args.dataloader_num_workers == 2 and args.dataloader_persistent_workers is True


def test_uint8_pixels_normalised_on_the_model_match_the_processors_floats(models, tmp_path):
    """Training carries pixels as uint8 patches (a quarter of the bytes) and the model normalises them as they
    enter it: the loss equals the float path's. Per-channel mean and std that differ catch a wrong channel axis."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vision_tower import normalise_pixels_on_model

    processor = AutoProcessor.from_pretrained(models("qwen3_vl"))
    processor.image_processor.image_mean, processor.image_processor.image_std = [0.1, 0.5, 0.8], [0.2, 0.3, 0.6]
    folder = _copy_images(tmp_path, ["130_a.jpg", "000_b.jpg"])
    cfg = _vlm_cfg(tmp_path, folder, image_min_pixels=4096, image_max_pixels=16384)
    examples = vlm_split(cfg, write=False)
    examples = examples["train"] + examples["validation"]
    model = AutoModelForImageTextToText.from_pretrained(models("qwen3_vl"), dtype=torch.float32).eval()
    floats = Collator(processor)([Encoder(processor, cfg)(ex) for ex in examples])
    raw = Collator(processor)([Encoder(processor, cfg, raw_pixels=True)(ex) for ex in examples])
    assert floats["pixel_values"].dtype == torch.float32 and raw["pixel_values"].dtype == torch.uint8
    assert raw["pixel_values"].shape == floats["pixel_values"].shape
    with torch.no_grad():
        reference = model(**floats).loss.item()
        unnormalised = model(**raw).loss.item()                    # no hook: the bytes enter as 0..255
        assert normalise_pixels_on_model(model, processor)
        assert model(**raw).loss.item() == pytest.approx(reference, abs=1e-5)
        assert model(**floats).loss.item() == pytest.approx(reference, abs=1e-6)   # floats pass untouched
    assert abs(unnormalised - reference) > 1e-3


def test_patch_embedding_runs_as_a_matmul_with_the_convolutions_values_and_gradients(models, monkeypatch):
    """The Qwen-VL patch embedding runs as one matmul (Conv3d is never called): the tower's output and the
    embedding weight's gradient equal the convolution's, from float pixels and from uint8 ones whose normalisation
    is folded into the weights; a LoRA adapter on the convolution still applies."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vision_tower import normalise_pixels_on_model, patch_embedding_as_matmul

    processor = AutoProcessor.from_pretrained(models("qwen3_vl"))
    ip = processor.image_processor
    ip.image_mean, ip.image_std = [0.1, 0.5, 0.8], [0.2, 0.3, 0.6]
    reference = AutoModelForImageTextToText.from_pretrained(models("qwen3_vl"), dtype=torch.float32)
    model = copy.deepcopy(reference)
    grid = torch.tensor([[1, 4, 6]])
    raw = torch.randint(0, 256, (24, 3 * 2 * ip.patch_size ** 2), dtype=torch.uint8)
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    floats = ((raw.reshape(24, 3, -1).float() / 255 - mean[None, :, None]) / std[None, :, None]).reshape(raw.shape)

    def tower(net, pixels):
        net.zero_grad()
        out = net.model.get_image_features(pixels, grid).pooler_output[0]
        out.square().sum().backward()
        return out.detach(), net.model.visual.patch_embed.proj.weight.grad.clone()

    expected, expected_grad = tower(reference, floats)
    assert patch_embedding_as_matmul(model) == 1
    assert normalise_pixels_on_model(model, processor)
    monkeypatch.setattr(torch.nn.Conv3d, "forward", lambda *a: pytest.fail("Conv3d ran"))
    body, captured = model.model, []
    body.visual.register_forward_hook(lambda m, a, o: captured.append(o.pooler_output) and None)
    ids = torch.tensor([[processor.image_token_id] * 6])
    for pixels in (floats, raw):  # uint8 through the body's forward, where they are recognised
        model.zero_grad()
        body(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=torch.ones_like(ids))
        out = captured.pop()
        out.square().sum().backward()
        grad = body.visual.patch_embed.proj.weight.grad
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
        assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert body.visual.patch_embed._pixel_affine is None  # folded for that one call only
    monkeypatch.undo()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["patch_embed.proj"], init_lora_weights=False))
    with torch.no_grad():
        adapted = lora.base_model.model.model.get_image_features(floats, grid).pooler_output[0]
    assert (adapted - expected).abs().max() > 1e-3


def test_patch_embedding_calls_its_convolution_where_deepspeed_partitions_it(monkeypatch):
    """Under ZeRO-3 a module's weights are gathered when the module itself is called: a partitioned convolution
    (DeepSpeed marks it with ds_id) is called as shipped, not read by the matmul path."""
    from types import SimpleNamespace

    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed

    from vision_tower import patch_embedding_as_matmul

    embed = Qwen3VLVisionPatchEmbed(SimpleNamespace(patch_size=16, temporal_patch_size=2, in_channels=3,
                                                    hidden_size=8))
    x = torch.rand(5, 3 * 2 * 16 * 16)
    with torch.no_grad():
        expected = embed(x)
    assert patch_embedding_as_matmul(embed) == 1
    calls, real = [], torch.nn.Conv3d.forward
    monkeypatch.setattr(torch.nn.Conv3d, "forward", lambda self, inp: calls.append(1) or real(self, inp))
    with torch.no_grad():
        embed(x)
        assert not calls
        embed.proj.weight.ds_id = 7
        assert torch.allclose(embed(x), expected, atol=1e-5) and calls


def test_encoder_keeps_float_pixels_where_the_processor_gives_no_bytes(models, tmp_path):
    """A processor that ignores the raw-pixel options (it resizes in float) keeps the float path: the Encoder drops
    the options instead of handing the model pixels it would normalise twice."""
    import torch
    from transformers import AutoProcessor

    real = AutoProcessor.from_pretrained(models("qwen3_vl"))

    class FloatOnly:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *args, do_rescale=None, do_normalize=None, **kwargs):
            return real(*args, **kwargs)

    folder = _copy_images(tmp_path, ["130_a.jpg", "000_b.jpg"])
    cfg = _vlm_cfg(tmp_path, folder, image_min_pixels=4096, image_max_pixels=16384)
    ex = vlm_split(cfg, write=False)["train"][0]
    encoder = Encoder(FloatOnly(), cfg, raw_pixels=True)
    pixels = encoder(ex)["pixel_values"]
    assert pixels.dtype == torch.float32 and encoder.image_kwargs == {}
    assert torch.equal(pixels, Encoder(real, cfg)(ex)["pixel_values"])


def test_packed_training_equals_random_padded_batches(models, tmp_path, caplog):
    """`packing: true` on a VLM with images of different sizes (so padded batches pad): the packed run trains
    exactly the random-order padded run (same train loss within 1e-4, each adapter tensor within 1e-3 relative),
    the frozen tower's output kept from the first epoch in both; `auto` pads on SDPA and says why."""
    from PIL import Image
    from safetensors.torch import load_file

    folder = _copy_images(tmp_path, [f"{c}_{i}.jpg" for i, c in enumerate(["000", "130", "141"] * 4)])
    for i, path in enumerate(sorted(folder.iterdir())):
        with Image.open(path) as im:
            im.convert("RGB").resize((64 + 32 * (i % 3), 64 + 32 * (i % 2))).save(path)
    runs = {}
    for name, flags in (("packed", ("--packing", "true")), ("padded", ("--packing", "false", "--group_by_length",
                                                                        "false")), ("auto", ())):
        out = tmp_path / name
        caplog.clear()
        with caplog.at_level("INFO"):
            assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3_vl"),
                            "--image_dir", folder, "--output_dir", out, "--num_train_epochs", "2",
                            "--save_strategy", "no", *flags) == 0
        run = out / "tiny-qwen3_vl"
        runs[name] = (json.loads((run / "train_results.json").read_text()),
                      load_file(run / "lora_model" / "adapter_model.safetensors"), caplog.text)
    (packed, packed_adapter, packed_log), (padded, padded_adapter, _) = runs["packed"], runs["padded"]
    assert "packing: samples of a batch in one row, kept apart by sdpa attention" in packed_log
    assert packed["vision_features_reused"] > 0
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], abs=1e-4)
    # Per tensor, not per value: Adam divides by the root of each gradient's square, so a coordinate whose gradient
    # is near zero turns float noise into a step of lr (measured up to 2e-3 on one value with torch 2.14), while
    # each tensor as a whole stays within 2e-4 of the padded run (lora_B starts at zero: all of it is training).
    for key in packed_adapter:
        change = (packed_adapter[key] - padded_adapter[key]).norm() / padded_adapter[key].norm()
        assert change < 1e-3, (key, change.item())
    assert "packing auto: a VLM on sdpa attention trains in padded batches" in runs["auto"][2]
