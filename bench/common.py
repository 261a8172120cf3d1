"""Shared pieces of the memory and GPU benchmarks: random-initialised models of a given size (built from a
config, no download), and one measured run of LoRA training steps through this project's own loading code.

Used by bench/memory.py and bench/gpu_bench.py; each measurement runs in its own process so that peak memory
belongs to one configuration only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Architecture sizes. "full" are the published Qwen3-1.7B and Qwen3-VL-2B-Instruct shapes.
PRESETS = {
    ("qwen3", "mid"): dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=128, vocab_size=32000),
    # Qwen3's 151,936-token vocabulary on a small body: the output layer's share of a real model, on a CPU.
    ("qwen3", "vocab"): dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=64, vocab_size=151936),
    ("qwen3", "full"): dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, vocab_size=151936),
    ("qwen3_vl", "mid"): dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=128, vocab_size=32000,
                              vision=dict(depth=4, hidden_size=512, intermediate_size=2048, num_heads=8,
                                          deepstack_visual_indexes=[1, 2, 3])),
    ("qwen3_vl", "full"): dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                           deepstack_visual_indexes=[5, 11, 17])),
}


def build_model(arch: str, preset: str, path: Path, device: str = "cpu") -> Path:
    """Save a random-initialised model of the preset's size, with the tiny model's tokenizer/processor."""
    import torch
    import transformers as tf

    import tiny_models

    if (path / "config.json").is_file():
        return path
    tiny = tiny_models.build(arch, path.parent / f"{path.name}-tiny")
    p = dict(PRESETS[(arch, preset)])
    vision = p.pop("vision", None)
    torch.manual_seed(0)
    if arch == "qwen3":
        config = tf.Qwen3Config(**p, tie_word_embeddings=True, max_position_embeddings=40960,
                                pad_token_id=0, eos_token_id=2, bos_token_id=2)
        cls = tf.Qwen3ForCausalLM
    else:
        base = json.loads((tiny / "config.json").read_text())
        text = dict(base["text_config"], **p)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[24, 20, 20])
        vis = dict(base["vision_config"], **vision, out_hidden_size=p["hidden_size"], num_position_embeddings=2304)
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vis, image_token_id=base["image_token_id"],
                                  video_token_id=base["video_token_id"],
                                  vision_start_token_id=base["vision_start_token_id"],
                                  vision_end_token_id=base["vision_end_token_id"], tie_word_embeddings=True)
        cls = tf.Qwen3VLForConditionalGeneration
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    with torch.device(device):
        torch.set_default_dtype(dtype)
        model = cls(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    for f in tiny.iterdir():
        if not f.name.startswith(("model", "config.json", "generation_config")):
            shutil.copy(f, path / f.name)
    del model
    return path


def count_params(model) -> tuple[int, int]:
    """(base parameters, trainable LoRA parameters); 4-bit weights are stored two to a byte."""
    import torch

    total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, lora


def measure(model_path: Path, arch: str, precision: str, device: str, grid: list[tuple[int, int]],
            steps: int = 5, lora_r: int = 16, image_side: int = 448, loss: str = "full", answer_share: float = 0.5,
            checkpointing: bool = True) -> list[dict]:
    """Load through model_config.load_base (as `python main.py --task train` does), attach LoRA on all linear
    layers, and time `steps` optimizer steps per (batch, length) with random tokens.
    loss: full (labels on every token, the model's own loss), masked (labels on the last answer_share of each
    sequence, the model's own loss over all logits), answer (the same labels, answer-only logits) or fused (the
    same labels, fused linear cross-entropy: liger on a GPU when installed, else torch)."""
    import psutil
    import torch
    import transformers  # noqa: F401 - imported before the baseline so that libraries do not count

    from config import build_config
    from losses import answer_only_loss, fused_answer_loss, fused_loss_backend
    from model_config import attach_lora, load_base
    from outputs import peak_memory_mb

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    bits = {"4bit": 4, "8bit": 8}.get(precision)
    dtype = {"fp32": "float32", "fp16": "float16"}.get(precision, "bfloat16")  # 8/4-bit compute in bf16
    cfg = build_config(dict(model_name_or_path=str(model_path), model_type="vlm" if arch == "qwen3_vl" else "llm",
                            device=device, dtype=dtype, train_quantization_bit=bits, lora_r=lora_r,
                            lora_alpha=2 * lora_r, target_modules=["all-linear"], gradient_checkpointing=checkpointing,
                            image_min_pixels=image_side ** 2, image_max_pixels=image_side ** 2), "bench")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model, processor = load_base(cfg, "train")
    model = attach_lora(model, cfg)
    model.train()  # as the Trainer does: gradient checkpointing and dropout act in training mode only
    weights = model.get_memory_footprint()  # parameter + buffer bytes (4-bit weights counted packed)
    n_total, n_lora = count_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dev = torch.device(device if device != "cuda" else "cuda:0")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision != "fp32")
    cfg_text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = min(cfg_text.vocab_size, 300)  # ids the tiny tokenizer knows (image tokens are placed separately)
    rows = []
    for batch, length in grid:
        inputs = {"input_ids": torch.randint(10, vocab, (batch, length), device=dev)}
        if arch == "qwen3_vl":
            from PIL import Image

            img = Image.new("RGB", (image_side, image_side), (120, 30, 200))
            msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "x"}]}]
            text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            enc = processor(text=[text] * batch, images=[img] * batch, return_tensors="pt")
            pad = length - enc["input_ids"].shape[1]
            ids = torch.cat([enc["input_ids"], torch.randint(10, vocab, (batch, max(pad, 0)))], 1)
            inputs = {"input_ids": ids.to(dev), "pixel_values": enc["pixel_values"].to(dev),
                      "image_grid_thw": enc["image_grid_thw"].to(dev)}
            if "mm_token_type_ids" in enc:
                types = torch.nn.functional.pad(enc["mm_token_type_ids"], (0, max(pad, 0)))
                inputs["mm_token_type_ids"] = types.to(dev)
        inputs["labels"] = inputs["input_ids"].clone()
        if loss != "full":
            inputs["labels"][:, : int(length * (1 - answer_share))] = -100
        fused = fused_loss_backend(model, "auto", sharded=False) if loss == "fused" else None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for i in range(steps + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                with autocast:
                    if loss in ("full", "masked"):
                        value = model(**inputs).loss
                    elif fused:
                        value = fused_answer_loss(model, inputs, fused)[0]
                    else:
                        value = answer_only_loss(model, inputs)[0]
                value.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first step warms up kernels and allocator
                    times.append(time.perf_counter() - t)
        except torch.OutOfMemoryError:
            rows.append(dict(precision=precision, batch=batch, length=length, error="out of memory"))
            torch.cuda.empty_cache()
            continue
        step = sum(times) / len(times)
        row = dict(arch=arch, precision=precision, device=device, batch=batch, length=length,
                   loss_path=loss + (f" ({fused})" if fused else ""), checkpointing=checkpointing,
                   params=n_total, lora_params=n_lora, step_seconds=round(step, 4),
                   tokens_per_second=round(batch * length / step, 1), loss=round(float(value), 4),
                   weights_mb=round(weights / 2**20, 1), **peak_memory_mb())
        row["peak_over_baseline_mb"] = round(row["peak_rss_mb"] - rss0 / 2**20, 1)
        if dev.type == "cuda":
            layers, hidden = cfg_text.num_hidden_layers, cfg_text.num_attention_heads * cfg_text.head_dim
            # Frozen base: forward 2N + input-gradient 2N; LoRA: 6N_lora; causal attention fwd+bwd: 6*L*s*d.
            flops_per_token = 4 * n_total + 6 * n_lora + 6 * layers * length * hidden
            row["mfu"] = round(flops_per_token * batch * length / step / 989e12, 4)
        rows.append(row)
    return rows


def run_child(script: str, args: list[str], timeout: int = 900) -> list[dict]:
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-1500:], proc.stderr[-3000:], file=sys.stderr)
        return [dict(args=" ".join(args), error=(proc.stderr.strip().splitlines() or ["failed"])[-1][:200])]
    return json.loads(line[7:])
