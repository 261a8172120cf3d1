"""Reliability: kill -9 and resume, Ctrl-C, NaN guard, atomic outputs, adapter ownership, bad inputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_main, small_llm_data
from outputs import atomic_dir, write_json

DEMO = str(ROOT / "configs" / "demo_llm.yaml")


def _train_args(models, tmp_path, **extra):
    data = small_llm_data(tmp_path / "data", n_train=8, n_val=2)
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--data_dir", data,
            "--output_dir", tmp_path / "out", "--per_device_train_batch_size", "2", "--num_train_epochs", "6",
            "--eval_strategy", "no", "--save_total_limit", "null"]
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    return args


def _spawn(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A suite started in the background (`nohup ... &`) ignores SIGINT, and children inherit that: give the child
    # the default disposition a terminal's Ctrl-C meets, so that Python installs its KeyboardInterrupt handler.
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--task", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_checkpoint(run_dir, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if any((c / "trainer_state.json").is_file() for c in run_dir.glob("checkpoint-*")):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _steps(run_dir):
    return json.loads((run_dir / "train_results.json").read_text())["global_step"]


def test_kill_9_then_resume_reaches_the_same_step(models, tmp_path):
    # Reference: the same run uninterrupted.
    ref = tmp_path / "ref"
    assert run_main("--task", "train", *_train_args(models, ref)) == 0
    expected = _steps(ref / "out" / "tiny-qwen3")
    assert expected == 24                                   # 8 samples / batch 2 x 6 epochs
    # Killed with SIGKILL right after its first complete checkpoint.
    run = tmp_path / "run"
    args = _train_args(models, run, save_strategy="steps", save_steps=2)
    proc = _spawn(args)
    run_dir = run / "out" / "tiny-qwen3"
    assert _wait_for_checkpoint(run_dir, proc), proc.communicate()[0].decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "lora_model").exists()
    killed_at = max(int(c.name.split("-")[1]) for c in run_dir.glob("checkpoint-*")
                    if (c / "trainer_state.json").is_file())
    assert killed_at < expected
    # Resumed: says so, and ends at the uninterrupted run's step with an adapter.
    proc = _spawn(args + ["--resume_from_checkpoint", "auto"])
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out and "global step" in out
    assert _steps(run_dir) == expected
    assert (run_dir / "lora_model" / "adapter_model.safetensors").is_file()
    print(f"killed at step {killed_at}, resumed to step {expected}")


@pytest.mark.parametrize("grouping", ["true", "false"])
def test_resume_in_mid_epoch_ends_with_the_uninterrupted_adapter(models, tmp_path, grouping):
    """Resumed from a checkpoint in the middle of an epoch, with length-grouped or random batches, a run must end
    with the same adapter as the run that was never stopped: the same remaining batches (their order depends on
    seed and epoch alone), optimizer, scheduler and random state."""
    from safetensors.torch import load_file

    settings = dict(save_strategy="steps", save_steps=2, group_by_length=grouping, num_train_epochs=3)
    ref = tmp_path / "ref"
    assert run_main("--task", "train", *_train_args(models, ref, **settings)) == 0
    ref_dir = ref / "out" / "tiny-qwen3"
    assert _steps(ref_dir) == 12                                          # 4 steps per epoch
    resumed = tmp_path / "resumed"
    assert run_main("--task", "train", *_train_args(models, resumed, **settings),
                    "--resume_from_checkpoint", ref_dir / "checkpoint-6") == 0  # half-way through epoch 2
    a = load_file(ref_dir / "lora_model" / "adapter_model.safetensors")
    b = load_file(resumed / "out" / "tiny-qwen3" / "lora_model" / "adapter_model.safetensors")
    start = load_file(ref_dir / "checkpoint-6" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3   # the last 6 steps did change it
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_ctrl_c_saves_a_checkpoint_and_exits_130(models, tmp_path):
    args = _train_args(models, tmp_path, num_train_epochs=400, save_strategy="no")
    proc = _spawn(args)
    run_dir = tmp_path / "out" / "tiny-qwen3"
    # Interrupt once a step has completed: the first step's loss line is printed (logging_first_step), so no
    # fixed sleep decides whether there is anything to save on a slow machine.
    buf = b""
    end = time.time() + 300
    while time.time() < end and b"'loss'" not in buf and proc.poll() is None:
        buf += proc.stdout.read1(4096)
    assert b"'loss'" in buf, buf.decode()[-3000:]
    proc.send_signal(signal.SIGINT)
    out = buf + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out.decode()[-3000:]
    ckpts = [c for c in run_dir.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    assert len(ckpts) == 1 and b"resume_from_checkpoint auto" in out


def test_setup_objects_are_kept_from_the_collector_during_training_only(models, tmp_path, monkeypatch):
    """The objects setup made are frozen out of the garbage collector while the Trainer runs (its full collections
    then skip them), and unfrozen after it, whether training ends or fails."""
    import gc

    import transformers

    seen, real = [], transformers.Trainer.train

    def train(self, *a, **k):
        seen.append(gc.get_freeze_count())
        if len(seen) == 2:
            raise RuntimeError("failed mid-training")
        return real(self, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "train", train)
    assert run_main("--task", "train", *_train_args(models, tmp_path, num_train_epochs=1)) == 0
    assert seen[0] > 1000 and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError, match="failed mid-training"):
        run_main("--task", "train", *_train_args(models, tmp_path, num_train_epochs=1), "--overwrite_output_dir")
    assert gc.get_freeze_count() == 0


def test_nan_loss_stops_with_a_message(models, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    real = Trainer.training_step

    def poisoned(self, *a, **kw):
        loss = real(self, *a, **kw)
        return loss * float("nan") if self.state.global_step >= 5 else loss

    monkeypatch.setattr(Trainer, "training_step", poisoned)
    args = _train_args(models, tmp_path, save_strategy="steps", save_steps=2)
    assert run_main("--task", "train", *args) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at step 6" in err and "learning rate" in err
    run_dir = tmp_path / "out" / "tiny-qwen3"
    assert "checkpoint-4" in err and (run_dir / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (run_dir / "lora_model").exists()


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "lora_model"
    target.mkdir()
    (target / "adapter.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "adapter.bin").write_text("half")
        raise RuntimeError("crash while saving")
    assert (target / "adapter.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["lora_model"]   # no temporary left behind
    with atomic_dir(target) as tmp:
        (tmp / "adapter.bin").write_text("new")
    assert (target / "adapter.bin").read_text() == "new"


def test_write_json_replaces_whole_file(tmp_path, monkeypatch):
    path = tmp_path / "eval_results.json"
    write_json(path, {"a": 1})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}


def test_adapter_of_another_base_model_is_refused(models, tmp_path, capsys):
    args = _train_args(models, tmp_path, num_train_epochs=1)
    assert run_main("--task", "train", *args) == 0
    other = tmp_path / "elsewhere" / "tiny-qwen3"                    # same folder name, other model
    shutil.copytree(models("qwen3"), other)
    swapped = [str(other) if a == str(models("qwen3")) else a for a in map(str, args)]
    assert run_main("--task", "train", *swapped) == 2
    err = capsys.readouterr().err
    assert "holds an adapter of another base model" in err and "--overwrite_output_dir" in err
    assert run_main("--task", "inference", *swapped) == 2
    assert "another base model" in capsys.readouterr().err
    assert run_main("--task", "train", *swapped, "--overwrite_output_dir") == 0


@pytest.mark.parametrize("setup,fragment", [
    (lambda d: (d / "train.json").unlink(), "train.json not found"),
    (lambda d: (d / "validation.json").write_text("[{]"), "invalid JSON at line 1, column 3"),
    (lambda d: (d / "train.json").write_text('{"text": "a"}'), "expected a JSON array"),
    (lambda d: (d / "train.json").write_text('[{"text": "", "target": "b"}]'), 'entry 0: "text" is empty'),
])
def test_bad_llm_data_through_main(models, tmp_path, capsys, setup, fragment):
    args = _train_args(models, tmp_path)
    setup(tmp_path / "data")
    assert run_main("--task", "train", *args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_missing_prompt_file_for_vlm(models, tmp_path, capsys):
    assert run_main("--task", "train", "--config", ROOT / "configs/demo_vlm.yaml", "--model_name_or_path",
                    models("qwen3_vl"), "--output_dir", tmp_path, "--prompt_file", tmp_path / "p.json") == 2
    assert "prompt file" in capsys.readouterr().err


def test_resume_from_a_bad_path(models, tmp_path, capsys):
    assert run_main("--task", "train", *_train_args(models, tmp_path), "--resume_from_checkpoint", tmp_path) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_debug_shows_traceback(models, tmp_path, capsys):
    args = _train_args(models, tmp_path)
    (tmp_path / "data" / "train.json").unlink()
    assert run_main("--task", "train", *args, "--debug") == 2
    assert "Traceback" in capsys.readouterr().err


def test_out_of_memory_becomes_a_hint(models, tmp_path, monkeypatch, capsys):
    import torch
    from transformers import Trainer

    def oom(self, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "training_step", oom)
    assert run_main("--task", "train", *_train_args(models, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "gradient_accumulation_steps" in err and "Traceback" not in err


def test_broken_prompt_json_and_folder_as_file(tmp_path):
    from config import UserError
    from data_loading import load_data_file, load_prompt

    bad = tmp_path / "prompt.json"
    bad.write_text('{"system_prompt": "inspect the pipe",}')
    with pytest.raises(UserError, match="invalid JSON at line 1"):
        load_prompt(bad)
    plain = tmp_path / "prompt.txt"
    plain.write_text("Inspect the pipe and answer in JSON.")
    assert load_prompt(plain) == "Inspect the pipe and answer in JSON."
    (tmp_path / "train.json").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        load_data_file(tmp_path / "train.json")


def test_adapter_owner_check_tolerates_other_working_directories(tmp_path):
    from model_config import _same_model

    model = tmp_path / "Qwen3-1.7B"
    model.mkdir()
    other = tmp_path / "copy" / "Qwen3-1.7B"
    other.mkdir(parents=True)
    assert _same_model(str(model), str(model / ".." / "Qwen3-1.7B"))
    assert not _same_model(str(model), str(other))                 # two real folders: must be the same one
    assert _same_model("./Qwen3-1.7B", str(model))                  # saved relative, run from elsewhere
    assert _same_model("Qwen/Qwen3-1.7B", str(model))               # hub name vs its local download
    assert not _same_model("Qwen/Qwen3-4B", str(model))
