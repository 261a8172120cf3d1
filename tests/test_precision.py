"""Precision and quantization: dtype resolution, 4/8-bit training and inference (bitsandbytes runs on CPU),
fp32 adapters, device errors; GPU/FP8 checks run only where CUDA is present."""

import json

import pytest
import torch
from safetensors import safe_open

from config import UserError, build_config
from conftest import ROOT, run_cli, run_main
from model_config import quantization_config, resolve_device, resolve_dtype

DEMO = str(ROOT / "configs" / "demo_llm.yaml")
_skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda(test):
    return pytest.mark.gpu(_skip(test))


def _cfg(**kw):
    return build_config(kw, "test")


def test_dtype_resolution_on_cpu(caplog):
    cpu = torch.device("cpu")
    assert resolve_dtype(_cfg(dtype="auto"), cpu) == torch.float32
    assert resolve_dtype(_cfg(dtype="bfloat16"), cpu) == torch.bfloat16
    assert resolve_dtype(_cfg(dtype="float16"), cpu) == torch.float32      # falls back, with a warning
    assert "float16 is slow and unstable on CPU" in caplog.text


def test_quantization_configs():
    q4 = quantization_config(4, torch.bfloat16, _cfg())
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    q8 = quantization_config(8, torch.float16, _cfg(model_type="vlm"))
    assert q8.load_in_8bit and q8.llm_int8_threshold == 6.0
    assert {"visual", "lm_head"} <= set(q8.llm_int8_skip_modules)         # vision tower stays unquantized
    assert quantization_config(None, torch.float32, _cfg()) is None


@pytest.mark.parametrize("bits", ["3", "4bit", "16"])
def test_bad_bits_refused(bits, capsys):
    assert run_main("--task", "train", "--config", DEMO, "--train_quantization_bit", bits) == 2
    assert "use one of: 4, 8, null" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu():
    with pytest.raises(UserError, match="--device cpu or --device auto"):
        resolve_device(_cfg(device="cuda:0"))
    assert resolve_device(_cfg(device="auto"))[1].type == "cpu"


def _memorised(path):
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    return sum(r["prediction"] == r["target"] for r in rows)


def test_4bit_training_then_8bit_and_full_precision_inference(tmp_path, caplog):
    args = ["--config", DEMO, "--model_name_or_path", tmp_path / "tiny-qwen3", "--output_dir", tmp_path / "out"]
    assert run_main("--task", "train", *args, "--train_quantization_bit", "4") == 0
    assert "4-bit" in caplog.text
    adapter = tmp_path / "out" / "tiny-qwen3" / "lora_model" / "adapter_model.safetensors"
    with safe_open(adapter, "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        assert dtypes == {torch.float32}   # fp32 adapters
    train_json = ROOT / "data" / "llm" / "train.json"
    for bits in ("8", "null"):
        out = tmp_path / f"p{bits}.jsonl"
        assert run_main("--task", "inference", *args, "--inference_quantization_bit", bits,
                        "--input", train_json, "--output", out) == 0
        assert _memorised(out) >= 12, f"{bits}: adapter trained on a 4-bit base does not carry over"
    # 8-bit on CPU: bitsandbytes warns on every matmul; the REPL shows it once, on stderr, never in the answer.
    question = json.loads(train_json.read_text(encoding="utf-8"))[0]
    proc = run_cli("--task", "inference", *args, "--inference_quantization_bit", "8",
                   stdin=question["text"] + "\n" + question["text"] + "\n")
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err[-2000:]
    assert out.count(question["target"]) == 2 and "cast" not in out
    assert err.count("inputs will be cast") <= 1, err.count("inputs will be cast")


def test_8bit_training(models, tmp_path):
    args = ["--config", DEMO, "--model_name_or_path", models("qwen3"), "--output_dir", tmp_path,
            "--num_train_epochs", "2", "--train_quantization_bit", "8", "--gradient_checkpointing"]
    assert run_main("--task", "train", *args) == 0
    res = json.loads((tmp_path / "tiny-qwen3" / "train_results.json").read_text())
    assert res["global_step"] == 8 and res["train_loss"] == res["train_loss"]   # finite


def test_vlm_4bit_keeps_vision_tower_unquantized(models):
    from model_config import load_base

    cfg = _cfg(model_type="vlm", model_name_or_path=str(models("qwen3_vl")), train_quantization_bit=4,
               device="cpu")
    model, _ = load_base(cfg, "train")
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert all(k != "Linear4bit" for n, k in kinds.items() if "visual" in n)
    assert any(k == "Linear4bit" for n, k in kinds.items() if "language_model" in n)
    assert kinds["lm_head"] == "Linear"


@cuda
def test_gpu_fp16_training_with_fp32_adapters(tmp_path):
    args = ["--config", DEMO, "--model_name_or_path", tmp_path / "m", "--output_dir", tmp_path / "o",
            "--device", "cuda:0", "--dtype", "float16", "--num_train_epochs", "2"]
    assert run_main("--task", "train", *args) == 0
    res = json.loads((tmp_path / "o" / "m" / "train_results.json").read_text())
    assert res["peak_gpu_memory_mb"] > 0 and res["train_loss"] == res["train_loss"]


@cuda
def test_gpu_fp8_checkpoint_loads(tmp_path):
    """An FP8 checkpoint (made here from the tiny model) loads as FP8 on >= 8.9 GPUs, dequantized elsewhere."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    import tiny_models

    src = tiny_models.build("qwen3", tmp_path / "src", hidden=256)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=FineGrainedFP8Config(
        weight_block_size=[128, 128]), device_map={"": 0})
    model.save_pretrained(tmp_path / "fp8")
    (tmp_path / "fp8").joinpath("tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (tmp_path / "fp8").joinpath("tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
    args = ["--config", DEMO, "--model_name_or_path", tmp_path / "fp8", "--tiny_model", "null",
            "--output_dir", tmp_path / "o", "--device", "cuda:0", "--num_train_epochs", "2"]
    assert run_main("--task", "train", *args) == 0
    assert run_main("--task", "evaluate", *args, "--max_new_tokens", "8") == 0


def _fp8_checkpoint(src, dst, block=128):
    """Write `src` as a block-wise FP8 (e4m3) checkpoint, the format of Qwen's -FP8 releases."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    out = {}
    for key, w in load_file(dst / "model.safetensors").items():
        if not (key.endswith("proj.weight") and ".layers." in key):
            out[key] = w
            continue
        rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
        scale = torch.zeros(rows, cols)
        q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
        for a in range(rows):
            for b in range(cols):
                blk = w[a * block:(a + 1) * block, b * block:(b + 1) * block]
                scale[a, b] = blk.abs().max() / 448
                q[a * block:(a + 1) * block, b * block:(b + 1) * block] = (blk / scale[a, b]).to(torch.float8_e4m3fn)
        out[key], out[key[:-len("weight")] + "weight_scale_inv"] = q, scale
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block], "fmt": "e4m3"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dequantization path")
def test_fp8_checkpoint_dequantized_on_cpu(models, tmp_path, caplog):
    from safetensors.torch import load_file

    from model_config import load_base

    fp8 = _fp8_checkpoint(models("qwen3"), tmp_path / "tiny-fp8")
    model, _ = load_base(_cfg(model_name_or_path=str(fp8), device="cpu"), "inference")
    assert "dequantizing the weights" in caplog.text
    w = model.model.layers[0].self_attn.q_proj.weight
    ref = load_file(models("qwen3") / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.float32 and (w - ref).abs().max() < 0.1 * ref.abs().max()
    args = ["--config", DEMO, "--model_name_or_path", fp8, "--output_dir", tmp_path / "o", "--num_train_epochs", "1"]
    assert run_main("--task", "train", *args) == 0
    assert run_main("--task", "inference", *args, "--input", ROOT / "data/llm/validation.json",
                    "--output", tmp_path / "p.jsonl", "--max_new_tokens", "8") == 0


def _has_avx512_bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return has_avx512bf16()


@pytest.mark.skipif(not _has_avx512_bf16(), reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
def test_4bit_base_stays_differentiable_after_an_eval_forward(models):
    """The validation pass (or the packing check) runs in eval mode: bitsandbytes would then switch the 4-bit
    weights to its AVX512-BF16 kernel, which has no backward, and the next training step would get no gradient
    through the frozen layers."""
    from model_config import load_base

    cfg = _cfg(model_name_or_path=str(models("qwen3")), train_quantization_bit=4, device="cpu")
    model, _ = load_base(cfg, "train")
    ids = torch.randint(5, 200, (2, 12))

    def input_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        return embeds.grad

    model.train()
    before = input_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    assert torch.allclose(input_grad(), before, atol=1e-5)
