"""Merge the trained adapter into the base model and write a standalone Hugging Face folder.

    python main.py --task export                          -> output/<model-name>/merged/
    python main.py --task export --export_dtype float32   other dtypes: bfloat16 (default), float16

The merged folder (safetensors weights, config, tokenizer or processor, generation config, chat template) loads
with plain transformers (`AutoModelForCausalLM` / `AutoModelForImageTextToText.from_pretrained`), no PEFT, and
serves with vLLM, TGI or any other Hugging Face loader. The base is always reloaded unquantized: an adapter
trained on a 4/8-bit base is merged into full-precision weights, never into dequantized 4-bit ones.
"""

from __future__ import annotations

import logging
import time

import torch

from config import Config
from data_processing import end_of_turn_ids
from model_config import adopt_training_settings, load_adapter, load_base, require_adapter
from outputs import atomic_dir

logger = logging.getLogger(__name__)


def merged_dir(cfg: Config):
    return cfg.run_dir / "merged"


def run(cfg: Config) -> int:
    require_adapter(cfg)
    adopt_training_settings(cfg)
    if cfg.train_quantization_bit or cfg.inference_quantization_bit:
        logger.info("the base model is reloaded unquantized for the merge (the adapter was trained on a %s base); "
                    "the merged weights are %s", f"{cfg.train_quantization_bit}-bit" if cfg.train_quantization_bit
                    else "full-precision", cfg.export_dtype)
    started = time.time()
    cfg.inference_quantization_bit = None  # merge into real weights, never into dequantized 4/8-bit ones
    model, processor = load_base(cfg, "inference")
    model = load_adapter(model, cfg).merge_and_unload()
    dtype = getattr(torch, cfg.export_dtype)
    model = model.to(dtype)
    model.config.use_cache = True
    # Servers stop where the chat template ends an answer, as this tool's own generation does.
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    model.generation_config.eos_token_id = eos + [i for i in end_of_turn_ids(processor) if i not in eos]
    out = merged_dir(cfg)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        cfg.save(tmp / "run_config.yaml")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    logger.info("merged model (%s, %.0f MB of weights) written to %s in %.1f s; load it with %s.from_pretrained",
                cfg.export_dtype, size, out, time.time() - started,
                "AutoModelForImageTextToText" if cfg.model_type == "vlm" else "AutoModelForCausalLM")
    return 0
