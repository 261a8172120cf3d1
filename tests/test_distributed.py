"""Several processes on one CPU machine (gloo): DDP training with torchrun, evaluate sharded across processes,
and two "machines" (two launchers, one process each) joined over the loopback address."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT

DEMO = str(ROOT / "configs" / "demo_llm.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _args(model, out, *extra):
    return ["--config", DEMO, "--model_name_or_path", str(model), "--output_dir", str(out), "--device", "cpu",
            "--num_train_epochs", "4", "--save_strategy", "epoch", "--save_total_limit", "1", *map(str, extra)]


def _run(cmd, timeout=600, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env or _env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory):
    """The same global batch (4) as one process x 4 and as two processes x 2; the model folder is absent, so it is
    built by the main process while the other waits."""
    tmp = tmp_path_factory.mktemp("ddp")
    single = _args(tmp / "m1" / "tiny-qwen3", tmp / "single", "--per_device_train_batch_size", "4")
    _run([sys.executable, str(ROOT / "main.py"), "--task", "train", *single])
    ddp = _args(tmp / "m2" / "tiny-qwen3", tmp / "ddp", "--per_device_train_batch_size", "2")
    proc = _run(TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(_port()), str(ROOT / "main.py"),
                            "--task", "train", *ddp])
    return tmp, single, ddp, proc


def test_ddp_trains_sharded_and_rank_zero_writes(single_and_ddp):
    tmp, _, _, proc = single_and_ddp
    one = json.loads((tmp / "single" / "tiny-qwen3" / "train_results.json").read_text())
    two = json.loads((tmp / "ddp" / "tiny-qwen3" / "train_results.json").read_text())
    assert one["global_step"] == two["global_step"] == 16        # 15 samples / global batch 4, 4 epochs
    run_dir = tmp / "ddp" / "tiny-qwen3"
    assert (run_dir / "lora_model" / "adapter_model.safetensors").is_file()
    assert len(list((run_dir / "cache").glob("train-*.json"))) == 1  # tokenised once
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-16"]
    assert proc.stderr.count("building the tiny random-initialised") == 1   # the model was built once
    assert not (run_dir / ".lock").exists()


def test_ddp_adapter_evaluates_like_the_single_process_one(single_and_ddp):
    tmp, single, ddp, _ = single_and_ddp
    results = {}
    for name, args in (("single", single), ("ddp", ddp)):
        _run([sys.executable, str(ROOT / "main.py"), "--task", "evaluate", *args])
        results[name] = json.loads((tmp / name / "tiny-qwen3" / "eval_results.json").read_text())
    # Same global batch, same steps; the data order differs, so the losses agree within a tolerance.
    assert results["ddp"]["eval_loss"] == pytest.approx(results["single"]["eval_loss"], rel=0.05)


def test_evaluate_sharded_across_processes_equals_one_process(single_and_ddp):
    tmp, single, _, _ = single_and_ddp
    out = tmp / "single" / "tiny-qwen3"
    _run([sys.executable, str(ROOT / "main.py"), "--task", "evaluate", *single])
    one = json.loads((out / "eval_results.json").read_text())
    one_rows = (out / "eval_predictions.jsonl").read_text(encoding="utf-8")
    _run(TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(_port()), str(ROOT / "main.py"),
                     "--task", "evaluate", *single])
    two = json.loads((out / "eval_results.json").read_text())
    assert two["num_samples"] == one["num_samples"] == 5
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert two["exact_match"] == one["exact_match"] and two["rouge_l"] == pytest.approx(one["rouge_l"])
    assert (out / "eval_predictions.jsonl").read_text(encoding="utf-8") == one_rows   # same rows, same order


def test_two_machines_on_loopback(tmp_path, models):
    port = _port()
    args = _args(models("qwen3"), tmp_path / "out", "--per_device_train_batch_size", "2", "--num_train_epochs", "1")
    procs = [subprocess.Popen(TORCHRUN + ["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                                          "--master_addr", "127.0.0.1", "--master_port", str(port),
                                          str(ROOT / "main.py"), "--task", "train", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    run_dir = tmp_path / "out" / "tiny-qwen3"
    assert (run_dir / "lora_model" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "train_results.json").read_text())["global_step"] == 4   # 15 / (2 x 2)


def test_sharding_refusals(models, tmp_path, capsys, monkeypatch):
    import torch

    from conftest import run_main

    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp_path]
    # On a CPU, accelerate would silently run plain DDP instead of FSDP: refused, saying what to run.
    assert run_main("--task", "train", *args, "--fsdp", "full_shard") == 2
    assert "FSDP across processes needs CUDA GPUs" in capsys.readouterr().err
    # DeepSpeed in several CPU processes: accelerate would let each train alone on its own copy.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert run_main("--task", "train", *args) == 2
    assert "DeepSpeed across processes needs CUDA GPUs" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)        # as on a GPU machine
    assert run_main("--task", "train", *args, "--train_quantization_bit", "4", "--fsdp", "full_shard") == 2
    assert "train_quantization_bit: 4 with FSDP is not supported" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")               # what accelerate launch sets
    assert run_main("--task", "train", *args, "--train_quantization_bit", "8") == 2
    assert "with DeepSpeed is not supported" in capsys.readouterr().err


DEEPSPEED_DIR = ROOT / ".deepspeed"  # where .ci/run installs it: apart, since accelerate imports it when importable


def _deepspeed_env() -> dict:
    """The environment of a run with DeepSpeed importable: installed, or in .deepspeed/ (CI). Skips where it is
    neither; fails where .deepspeed/ exists but does not import."""
    env = _env()
    if DEEPSPEED_DIR.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DEEPSPEED_DIR), env.get("PYTHONPATH")]))
    check = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, env=env)
    if check.returncode:
        assert not DEEPSPEED_DIR.is_dir(), check.stderr[-2000:]
        pytest.skip("deepspeed is not installed (.ci/run puts it in .deepspeed/)")
    return env


ZERO3_ALL_PARTITIONED = {  # persistence threshold 0: every weight is partitioned, LoRA's too, as at real sizes
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                          "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def test_deepspeed_zero3_saves_gathered_lora_weights_on_cpu(models, tmp_path):
    """DeepSpeed ZeRO-3 in one CPU process (all accelerate runs DeepSpeed with on a CPU): the weights live as
    partitions, so saving the adapter must gather them; an ungathered save writes empty tensors. The adapter equals
    the plain run's and evaluates the same."""
    from safetensors.torch import load_file

    env = _deepspeed_env()
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps(ZERO3_ALL_PARTITIONED))
    common = ["--num_train_epochs", "2", "--save_strategy", "no"]
    zero3 = _args(models("qwen3"), tmp_path / "zero3", *common, "--deepspeed", ds)
    proc = _run(TORCHRUN + ["--nproc_per_node", "1", "--master_port", str(_port()), str(ROOT / "main.py"),
                            "--task", "train", *zero3], env=env)
    assert "DeepSpeed on a CPU runs in this one process" in proc.stderr
    plain = _args(models("qwen3"), tmp_path / "plain", *common)
    _run([sys.executable, str(ROOT / "main.py"), "--task", "train", *plain])
    got = load_file(tmp_path / "zero3" / "tiny-qwen3" / "lora_model" / "adapter_model.safetensors")
    want = load_file(tmp_path / "plain" / "tiny-qwen3" / "lora_model" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name               # gathered, not an empty partition
        assert float((got[name] - want[name]).abs().max()) < 1e-3, name
    _run([sys.executable, str(ROOT / "main.py"), "--task", "evaluate", *zero3[:-2]])   # loads in a plain process
    evaluated = json.loads((tmp_path / "zero3" / "tiny-qwen3" / "eval_results.json").read_text())["eval_loss"]
    trained = [json.loads((tmp_path / n / "tiny-qwen3" / "train_results.json").read_text())["eval_loss"]
               for n in ("zero3", "plain")]   # zero3: computed on every process after training (collective)
    assert evaluated == pytest.approx(trained[1], rel=1e-4) and trained[0] == pytest.approx(trained[1], rel=1e-4)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() == 0, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["zero2", "zero3", "zero3_offload", "fsdp"])
def test_sharded_backend_saves_an_adapter_that_evaluates_like_ddp(backend, tmp_path):
    """ZeRO-2/3 and FSDP through the shipped accelerate configs, on every GPU of the machine (one is enough to
    exercise the sharded save): the adapter holds full LoRA weights, loads in a plain evaluate, and scores like
    the DDP run of the same global batch."""
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    n = _gpus()
    results = {}
    for name in ("ddp", backend):
        args = ["--config", DEMO, "--model_name_or_path", str(tmp_path / "m" / "tiny-qwen3"), "--output_dir",
                str(tmp_path / name), "--num_train_epochs", "4", "--save_strategy", "no",
                "--per_device_train_batch_size", str(4 // n if 4 % n == 0 else 4)]
        _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / f"{name}.yaml"), "--num_processes", str(n), "--main_process_port",
              str(_port()), str(ROOT / "main.py"), "--task", "train", *args], timeout=900)
        from safetensors.torch import load_file

        weights = load_file(tmp_path / name / "tiny-qwen3" / "lora_model" / "adapter_model.safetensors")
        assert weights and all(t.numel() > 0 for t in weights.values())     # gathered, not empty shards
        _run([sys.executable, str(ROOT / "main.py"), "--task", "evaluate", *args])
        results[name] = json.loads((tmp_path / name / "tiny-qwen3" / "eval_results.json").read_text())
        trained = json.loads((tmp_path / name / "tiny-qwen3" / "train_results.json").read_text())
        print(f"{name}: {n} GPU(s), peak GPU memory {trained.get('peak_gpu_memory_mb')} MB per process, "
              f"eval_loss {results[name]['eval_loss']:.4f}")
    assert results[backend]["eval_loss"] == pytest.approx(results["ddp"]["eval_loss"], rel=0.05)


def test_every_task_ends_by_leaving_the_process_group(monkeypatch, tmp_path):
    """A process that exits still in the group can be aborted by gloo while the others finish ("terminate called
    without an active exception", seen once in CI): main leaves the group after the task, on every process."""
    import torch.distributed as dist

    import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    seen = []
    monkeypatch.setitem(main.TASKS, "inference", lambda cfg: seen.append(dist.is_initialized()) or 0)
    assert main.main(["--task", "inference", "--config", DEMO]) == 0
    assert seen == [True] and not dist.is_initialized()
