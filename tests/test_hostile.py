"""An adversarial user: writes outside output_dir, concurrent runs, mismatched resumes, silent data changes,
hangs, and inputs that used to end in a traceback. Each case fails without the code it names."""

import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from config import UserError, build_config
from conftest import ROOT, run_cli, run_main, small_llm_data, write_json

DEMO = str(ROOT / "configs" / "demo_llm.yaml")
DEMO_VLM = str(ROOT / "configs" / "demo_vlm.yaml")


def _args(model, tmp_path, **extra):
    data = small_llm_data(tmp_path / "data", n_train=4, n_val=2)
    args = ["--config", DEMO, "--model_name_or_path", model, "--data_dir", data, "--output_dir", tmp_path / "out",
            "--num_train_epochs", "1", "--eval_strategy", "no"]
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    return args


# ---------------------------------------------------------------------------------------------------- writes
def test_model_path_ending_in_dotdot_stays_inside_output_dir(models, tmp_path):
    real = tmp_path / "mdl"
    shutil.copytree(models("qwen3"), real)
    (real / "sub").mkdir()
    bystander = tmp_path / "checkpoint-1"          # an unrelated folder beside output_dir
    bystander.mkdir()
    args = _args(str(real / "sub" / ".."), tmp_path, save_strategy="epoch", save_total_limit=1)
    assert run_main("--task", "train", *args) == 0
    assert (tmp_path / "out" / "mdl" / "lora_model" / "adapter_config.json").is_file()
    assert bystander.is_dir() and not (tmp_path / "lora_model").exists()
    assert build_config({"model_name_or_path": "x/../../..", "output_dir": "o"}, "t").run_dir.parent.name == "o"


def test_second_training_into_the_same_folder_is_refused(models, tmp_path, capsys, caplog):
    args = _args(models("qwen3"), tmp_path)
    run_dir = tmp_path / "out" / "tiny-qwen3"
    run_dir.mkdir(parents=True)
    # Another process holds the lock (flock), as a live run does.
    holder = ("import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid(), 'task': 'train', "
              "'host': os.uname().nodename, 'started': 'earlier'}).encode()); print('held', flush=True); "
              "time.sleep(60)")
    sleeper = subprocess.Popen([sys.executable, "-c", holder, str(run_dir / ".lock")], stdout=subprocess.PIPE)
    try:
        assert sleeper.stdout.readline().strip() == b"held"
        assert run_main("--task", "train", *args) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (train, process {sleeper.pid}" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone: the lock is stale and taken over; after the run it is released.
    with caplog.at_level(logging.WARNING):
        assert run_main("--task", "train", *args) == 0
    assert f"left by process {sleeper.pid}, which has ended" in caplog.text
    assert not (run_dir / ".lock").exists()


def test_two_concurrent_trainings_one_is_refused(models, tmp_path):
    args = _args(models("qwen3"), tmp_path, num_train_epochs=200)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--task", "train", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        lock = tmp_path / "out" / "tiny-qwen3" / ".lock"
        end = time.time() + 120
        while not lock.exists() and time.time() < end and first.poll() is None:
            time.sleep(0.05)
        second = run_cli("--task", "train", *args)
        assert second.returncode == 2 and f"process {first.pid}" in second.stderr.decode()
    finally:
        first.kill()
        first.wait()


def test_home_and_variables_expand_in_path_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "d"))
    cfg = build_config({"output_dir": "~/runs", "data_dir": "$DATA_ROOT/llm"}, "t")
    assert cfg.output_dir == str(tmp_path / "runs") and cfg.data_dir == str(tmp_path / "d" / "llm")


def test_stale_temporaries_removed_and_outputs_follow_the_umask(models, tmp_path):
    run_dir = tmp_path / "out" / "tiny-qwen3"
    (run_dir / ".lora_model.abc123.tmp").mkdir(parents=True)           # left by a kill -9 mid-save
    (run_dir / ".train_results.json.x.tmp").write_text("{")
    old = os.umask(0o022)
    try:
        assert run_main("--task", "train", *_args(models("qwen3"), tmp_path)) == 0
    finally:
        os.umask(old)
    assert not list(run_dir.glob(".*.tmp"))
    assert (run_dir / "lora_model").stat().st_mode & 0o777 == 0o755
    assert (run_dir / "train_results.json").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_from_another_base_models_checkpoint_is_refused(models, tmp_path, capsys):
    first = tmp_path / "a" / "tiny"
    shutil.copytree(models("qwen3"), first)
    args = _args(first, tmp_path, save_strategy="epoch")
    assert run_main("--task", "train", *args) == 0
    ckpt = next((tmp_path / "out" / "tiny").glob("checkpoint-*"))
    assert json.loads((ckpt / "run_identity.json").read_text())["base_model"] == str(first.resolve())
    other = tmp_path / "b" / "tiny"                                     # same folder name, another architecture
    shutil.copytree(models("gpt2"), other)
    swapped = [str(other) if str(a) == str(first) else str(a) for a in args]
    assert run_main("--task", "train", *swapped, "--resume_from_checkpoint", "auto", "--overwrite_output_dir") == 2
    err = capsys.readouterr().err
    assert "was trained on the base model" in err and str(first.resolve()) in err and "Traceback" not in err
    # The same model resumes; edited training data does not.
    assert run_main("--task", "train", *args, "--resume_from_checkpoint", "auto", "--num_train_epochs", "2") == 0
    rows = json.loads((tmp_path / "data" / "train.json").read_text(encoding="utf-8"))
    rows[0]["target"] = "changed"
    write_json(tmp_path / "data" / "train.json", rows)
    assert run_main("--task", "train", *args, "--resume_from_checkpoint", "auto", "--num_train_epochs", "3") == 2
    assert "training data changed since" in capsys.readouterr().err


def _vlm_images(tmp_path, names):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    src = sorted((ROOT / "data/vlm/images").iterdir())
    for i, name in enumerate(names):
        shutil.copy(src[i], folder / name)
    return folder


def _vlm_cfg(tmp_path, folder, **kw):
    return build_config(dict(model_type="vlm", image_dir=str(folder), output_dir=str(tmp_path / "out"),
                             label_map_file=str(ROOT / "data/vlm/label_map.json"),
                             prompt_file=str(ROOT / "data/vlm/prompt.json"), model_name_or_path=str(tmp_path / "m"),
                             **kw), "test")


def test_added_images_never_move_and_changed_seed_keeps_the_split(tmp_path, caplog):
    from data_loading import vlm_split

    names = [f"{c}_{i}.jpg" for c in ("000", "130", "141") for i in range(5)]
    folder = _vlm_images(tmp_path, names)
    first = vlm_split(_vlm_cfg(tmp_path, folder), write=True)
    before_val = {e.image for e in first["validation"]}
    before_train = {e.image for e in first["train"]}
    _vlm_images(tmp_path, names + [f"000_new{i}.jpg" for i in range(5)])
    with caplog.at_level(logging.INFO):
        grown = vlm_split(_vlm_cfg(tmp_path, folder, seed=99, validation_split=0.5), write=True)
    after_val = {e.image for e in grown["validation"]}
    after_train = {e.image for e in grown["train"]}
    assert before_val <= after_val and before_train <= after_train      # nothing changed sides
    assert len(after_val | after_train) == 20 and not after_val & after_train
    assert sum("000_new" in f for f in after_val) >= 1                 # the new code-000 images are validated too
    assert "`seed` = 99, but" in caplog.text and "`validation_split` = 0.5, but" in caplog.text
    saved = json.loads((tmp_path / "out" / "m" / "split.json").read_text())
    assert saved["seed"] == 42 and saved["validation_split"] == 0.2
    resplit = vlm_split(_vlm_cfg(tmp_path, folder, seed=99, validation_split=0.5, resplit=True), write=True)
    assert len(resplit["validation"]) > len(grown["validation"])


def test_vlm_resume_after_images_were_added_is_refused(models, tmp_path, capsys):
    names = [f"{c}_{i}.jpg" for c in ("000", "131") for i in range(3)]
    folder = _vlm_images(tmp_path, names)
    args = ["--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"), "--image_dir", folder,
            "--output_dir", tmp_path / "out", "--num_train_epochs", "1", "--save_strategy", "epoch"]
    assert run_main("--task", "train", *args) == 0
    _vlm_images(tmp_path, names + ["000_late.jpg"])
    assert run_main("--task", "train", *args, "--resume_from_checkpoint", "auto", "--num_train_epochs", "2") == 2
    assert "split.json grew" in capsys.readouterr().err


def test_missing_validation_images_are_named(tmp_path, caplog):
    from data_loading import vlm_split

    folder = _vlm_images(tmp_path, [f"000_{i}.jpg" for i in range(6)])
    split = vlm_split(_vlm_cfg(tmp_path, folder), write=True)
    gone = split["validation"][0].image
    os.remove(gone)
    with caplog.at_level(logging.WARNING):
        vlm_split(_vlm_cfg(tmp_path, folder), write=False)
    assert "1 validation images listed in" in caplog.text and os.path.basename(gone) in caplog.text


@pytest.mark.parametrize("content,fragment", [
    ('["a.jpg"]', "expected {\"train\""),
    ('{"train": "x", "validation": []}', "expected {\"train\""),
])
def test_damaged_split_file_is_refused_by_name(tmp_path, content, fragment):
    from data_loading import vlm_split

    folder = _vlm_images(tmp_path, ["000_a.jpg", "000_b.jpg"])
    split_file = tmp_path / "out" / "m" / "split.json"
    split_file.parent.mkdir(parents=True)
    split_file.write_text(content)
    with pytest.raises(UserError, match="split.json: expected"):
        vlm_split(_vlm_cfg(tmp_path, folder), write=False)


def test_duplicate_label_field_is_refused(tmp_path):
    from data_loading import load_label_map

    lm = write_json(tmp_path / "lm.json", {"positions": [{"field": "status", "map": {"0": "ok"}},
                                                         {"field": "status", "map": {"0": "x"}}]})
    with pytest.raises(UserError, match=r"positions\[1\] repeats the field name 'status'"):
        load_label_map(lm)


# ---------------------------------------------------------------------------------------------------- images
def test_sixteen_bit_png_is_scaled_not_white(tmp_path):
    import numpy as np

    from data_loading import load_image

    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (16, 1))
    path = tmp_path / "000_deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    rgb = np.asarray(load_image(str(path)))
    assert rgb.shape == (16, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert 100 < rgb.mean() < 155                                   # a ramp, not a white sheet


def test_truncated_and_elongated_images_are_caught_early(tmp_path):
    from data_loading import check_image

    good = sorted((ROOT / "data/vlm/images").iterdir())[0]
    cut = tmp_path / "000_cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in check_image(cut)
    thin = tmp_path / "000_thin.png"
    Image.new("RGB", (4000, 2)).save(thin)
    assert "more elongated than 200:1" in check_image(thin)
    assert check_image(good) is None


def test_skipped_files_are_logged_and_more_formats_accepted(tmp_path, caplog):
    from data_loading import list_images

    folder = _vlm_images(tmp_path, ["000_a.jpg"])
    Image.new("RGB", (32, 32)).save(folder / "000_b.gif")
    Image.new("RGB", (32, 32)).save(folder / "000_c.tif")
    (folder / "sub").mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "000_gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level(logging.WARNING):
        files = list_images(folder)
    assert [f.name for f in files] == ["000_a.jpg", "000_b.gif", "000_c.tif"]
    for fragment in ("1 broken links: 000_gone.jpg", "1 sub-folders (not searched): sub",
                     "1 files of other types: notes.txt"):
        assert fragment in caplog.text


def test_field_names_with_slashes_do_not_break_evaluate(models, tmp_path):
    folder = _vlm_images(tmp_path, [f"{c}_{i}.jpg" for c in ("0", "1") for i in range(3)])
    lm = write_json(tmp_path / "lm.json", {"positions": [{"field": "leak/state", "map": {"0": "no", "1": "yes"}}]})
    assert run_main("--task", "evaluate", "--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"),
                    "--image_dir", folder, "--label_map_file", lm, "--output_dir", tmp_path / "out",
                    "--use_original_model", "--max_new_tokens", "8") == 0
    assert list((tmp_path / "out").glob("*/confusion_leak_state_original_model.png"))


# ---------------------------------------------------------------------------------------------------- hangs
def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nlora_r: *i\n")
    started = time.time()
    proc = run_cli("--task", "train", "--config", bomb)
    assert proc.returncode == 2 and time.time() - started < 30
    assert "expands to more than" in proc.stderr.decode() and len(proc.stderr) < 2000


def test_max_new_tokens_is_bounded_by_the_context(models, caplog):
    from model_config import load_for_inference

    cfg = build_config({"model_name_or_path": str(models("qwen3")), "use_original_model": True,
                        "max_new_tokens": 10**9, "device": "cpu"}, "t")
    with caplog.at_level(logging.WARNING):
        load_for_inference(cfg)
    assert cfg.max_new_tokens == 2048 and "context length (2048 tokens)" in caplog.text


# ---------------------------------------------------------------------------------------------------- work kept
def test_validation_longer_than_max_length_does_not_crash_training(models, tmp_path, caplog):
    data = tmp_path / "data"
    write_json(data / "train.json", [{"text": "短问题", "target": "短回答"}] * 4)
    write_json(data / "validation.json", [{"text": "很长的问题" * 60, "target": "回答"}] * 2)
    with caplog.at_level(logging.WARNING):
        assert run_main("--task", "train", "--config", DEMO, "--model_name_or_path", models("qwen3"),
                        "--data_dir", data, "--output_dir", tmp_path / "out", "--max_length", "32",
                        "--num_train_epochs", "1", "--eval_strategy", "epoch") == 0
    assert "every validation sample is longer than max_length=32" in caplog.text


def test_batch_output_checked_first_and_written_incrementally(models, tmp_path, capsys, monkeypatch):
    import inference

    questions = write_json(tmp_path / "q.json", [{"text": f"问题{i}"} for i in range(20)])
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp_path / "out",
            "--use_original_model", "--max_new_tokens", "2", "--per_device_eval_batch_size", "1"]
    loaded = []
    monkeypatch.setattr(inference, "load_for_inference", lambda cfg: loaded.append(1))
    assert run_main("--task", "inference", *args, "--input", questions, "--output", tmp_path) == 2
    assert "is a folder" in capsys.readouterr().err and not loaded          # refused before the model loads
    monkeypatch.undo()
    import generation

    real = generation.generate_batch
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine fell over")
        return real(*a, **kw)

    monkeypatch.setattr(generation, "generate_batch", flaky)
    out = tmp_path / "p.jsonl"
    with pytest.raises(RuntimeError):
        run_main("--task", "inference", *args, "--input", questions, "--output", out)
    partial = tmp_path / "p.jsonl.partial"
    assert not out.exists() and len(partial.read_text(encoding="utf-8").splitlines()) == 8   # first chunk kept


def test_vlm_input_list_of_non_strings(models, tmp_path, capsys):
    listing = write_json(tmp_path / "imgs.json", ["data/vlm/images/000_x.jpg", 5])
    assert run_main("--task", "inference", "--config", DEMO_VLM, "--model_name_or_path", models("qwen3_vl"),
                    "--output_dir", tmp_path, "--use_original_model", "--input", listing) == 2
    assert "entry 1 is 5, not an image path" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- start-up
@pytest.mark.parametrize("flags,fragment", [
    (["--num_train_epochs", "inf"], "expected a finite number"),
    (["--learning_rate", "nan"], "expected a finite number"),
    (["--seed", "-1"], "must be in 0 .. 4294967295"),
    (["--seed", str(2**32)], "must be in 0 .. 4294967295"),
    (["--lora_r", "100000"], "must be <= 4096"),
])
def test_start_up_values(flags, fragment, capsys):
    assert run_main("--task", "train", "--config", DEMO, *flags) == 2
    assert fragment in capsys.readouterr().err


def test_start_up_environment(models, tmp_path, capsys):
    base = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp_path / "o"]
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("system_prompt: caf\xe9\n".encode("latin-1"))
    assert run_main("--task", "train", "--config", latin) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert run_main("--task", "evaluate", *base, "--device", "mps", "--use_original_model") == 2
    assert "MPS back end is not available" in capsys.readouterr().err
    assert run_main("--task", "evaluate", *base, "--attn_implementation", "flash_attention_2",
                    "--use_original_model") == 2
    assert "needs a CUDA GPU and the flash-attn package" in capsys.readouterr().err
    assert run_main("--task", "train", *_args(models("qwen3"), tmp_path), "--lora_r", "1000") == 2
    assert "larger than the narrowest target layer" in capsys.readouterr().err
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "train.json").write_text("[" * 100_000 + "]" * 100_000)
    (deep / "validation.json").write_text("[]")
    assert run_main("--task", "train", *base, "--data_dir", deep) == 2
    assert "nested too deeply" in capsys.readouterr().err


def test_truncated_cache_is_rebuilt(models, tmp_path, caplog):
    args = _args(models("qwen3"), tmp_path)
    assert run_main("--task", "train", *args) == 0
    cache = next((tmp_path / "out" / "tiny-qwen3" / "cache").glob("train-*.json"))
    cache.write_text(cache.read_text()[:50])
    with caplog.at_level(logging.WARNING):
        assert run_main("--task", "train", *args) == 0
    assert "is damaged (cut short by a crash?)" in caplog.text


# ---------------------------------------------------------------------------------------------------- outputs
def test_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert run_main("--task", "train", "--config", DEMO, "--output_dir", target) == 2
    assert "`output_dir`" in capsys.readouterr().err


def test_read_only_output_is_found_before_training(models, tmp_path, capsys):
    if os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
        pytest.skip("no read-only file system here to write into")
    assert run_main("--task", "train", *_args(models("qwen3"), tmp_path), "--output_dir", "/sys/lora-test") == 2
    err = capsys.readouterr().err
    assert "cannot write to /sys/lora-test" in err and "Traceback" not in err


def test_disk_full_while_saving_keeps_the_previous_adapter(models, tmp_path, monkeypatch, capsys):
    import train

    args = _args(models("qwen3"), tmp_path)
    assert run_main("--task", "train", *args) == 0
    lora = tmp_path / "out" / "tiny-qwen3" / "lora_model"
    before = (lora / "adapter_model.safetensors").read_bytes()

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "save_training_settings", full)
    assert run_main("--task", "train", *args, "--seed", "3") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "were left as they were" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert (lora / "adapter_model.safetensors").read_bytes() == before
    assert not list(lora.parent.glob(".lora_model*"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_in_an_adapter_is_refused_by_name(models, tmp_path, capfd):
    args = _args(models("qwen3"), tmp_path)
    assert run_main("--task", "train", *args) == 0
    lora = tmp_path / "out" / "tiny-qwen3" / "lora_model"
    (lora / "adapter_model.safetensors").unlink()
    (lora / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    capfd.readouterr()
    assert run_main("--task", "evaluate", *args) == 2
    out, err = capfd.readouterr()          # os.system's child would write to file descriptor 1
    assert f"refused to load {lora / 'adapter_model.bin'}" in err and "weights_only" in err
    assert "pwned" not in out + err


def test_pickled_code_in_a_model_folder_or_checkpoint_is_refused_by_name(models, tmp_path, capfd):
    model = tmp_path / "evil-model"
    shutil.copytree(models("qwen3"), model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    assert run_main("--task", "evaluate", "--config", DEMO, "--model_name_or_path", model, "--output_dir",
                    tmp_path / "o", "--use_original_model") == 2
    out, err = capfd.readouterr()
    assert f"refused to load {model / 'pytorch_model.bin'}" in err and "Traceback" not in err
    assert "pwned" not in out + err
    args = _args(models("qwen3"), tmp_path, save_strategy="epoch")
    assert run_main("--task", "train", *args) == 0
    ckpt = next((tmp_path / "out" / "tiny-qwen3").glob("checkpoint-*"))
    (ckpt / "rng_state.pth").write_bytes(pickle.dumps({"x": _Evil()}))
    capfd.readouterr()
    assert run_main("--task", "train", *args, "--resume_from_checkpoint", "auto", "--num_train_epochs", "2") == 2
    out, err = capfd.readouterr()
    assert "refused to load" in err and "rng_state.pth" in err and "Traceback" not in err
    assert "pwned" not in out + err
