"""Merge the trained adapter into the base model and write a standalone Hugging Face folder, or GGUF.

    python main.py --task export                          -> output/<model-name>/merged/
    python main.py --task export --export_dtype float32   other dtypes: bfloat16 (default), float16
    python main.py --task export --export_format gguf     -> output/<model-name>/gguf/ (gguf_export.py)
    python main.py --task export --export_format gguf_lora    the adapter alone, for llama-server --lora

The merged folder (safetensors weights, config, tokenizer or processor, generation config, chat template) loads
with plain transformers (`AutoModelForCausalLM` / `AutoModelForImageTextToText.from_pretrained`), no PEFT, and
serves with vLLM, TGI or any other Hugging Face loader. The base is always reloaded unquantized: an adapter
trained on a 4/8-bit base is merged into full-precision weights, never into dequantized 4-bit ones.
A VLM export also writes response_schema.json (the label map's JSON schema) for clients of other servers
(vLLM, SGLang) to pass as response_format, and the log gives the vLLM and SGLang commands (README: Serving).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from config import Config
from data_processing import end_of_turn_ids
from generation import vlm_label_map
from model_config import adopt_training_settings, load_adapter, load_base, load_processor, require_adapter
from outputs import MANIFEST, atomic_dir, refuse_foreign, remove_stale_temporaries, run_lock
from structured import label_schema

logger = logging.getLogger(__name__)


def merged_dir(cfg: Config):
    return cfg.run_dir / "merged"


def run(cfg: Config) -> int:
    require_adapter(cfg)
    if cfg.export_format != "hf":
        return _export_gguf(cfg)
    refuse_foreign(merged_dir(cfg))  # before the (slow) merge: a user's file there would be lost
    with run_lock(cfg.run_dir, "export"):
        remove_stale_temporaries(cfg.run_dir, of=merged_dir(cfg).name)
        adopt_training_settings(cfg)
        merge(cfg)
    return 0


def _export_gguf(cfg: Config) -> int:
    """llama.cpp's converter on the merged folder (merged first unless it is newer than the adapter)."""
    import gguf_export
    from model_resolver import resolve_model

    adopt_training_settings(cfg)
    base = Path(resolve_model(cfg))
    gguf_export.check(cfg, base)  # before the merge: dependencies, type, architecture
    with run_lock(cfg.run_dir, "export"):
        if cfg.export_format == "gguf_lora":
            files = gguf_export.export_lora(cfg, base)
            processor = load_processor(cfg, str(base), "inference")
        else:
            merged = merged_dir(cfg)
            wanted = gguf_merge_dtype(cfg.gguf_type)
            if cfg.export_dtype != wanted and "export_dtype" in cfg.cli_keys:
                logger.info("export_dtype %s is for --export_format hf: a %s GGUF is converted from a %s merge",
                            cfg.export_dtype, cfg.gguf_type, wanted)
            cfg.export_dtype = wanted
            if reusable_merge(cfg, merged):
                logger.info("converting the merged model %s (%s, written after the adapter; --task export "
                            "--export_format hf writes it again)", merged, wanted)
                processor = load_processor(cfg, str(merged), "inference")
            else:
                refuse_foreign(merged)
                remove_stale_temporaries(cfg.run_dir, of=merged.name)
                processor = merge(cfg)
            files = gguf_export.export_merged(cfg, merged, processor)
    for command in gguf_export.serve_commands(cfg, files, processor):
        logger.info("serve it: %s", command)
    return 0


def gguf_merge_dtype(gguf_type: str) -> str:
    """The dtype of the merge a GGUF type is converted from: at least as precise as the GGUF itself (a bfloat16
    merge converted to f16 or f32 has already lost mantissa bits). Quantized types start from f16 (q8_0 too:
    its scales are f16)."""
    return {"f32": "float32", "bf16": "bfloat16"}.get(gguf_type, "float16")


def reusable_merge(cfg: Config, merged: Path) -> bool:
    """Whether merged/ is this tool's merge of the current adapter at cfg.export_dtype (written after the
    adapter); one at another dtype is said and merged again, never converted silently."""
    adapter_time = max(f.stat().st_mtime for f in cfg.lora_dir.iterdir() if f.is_file())
    if not (merged / MANIFEST).is_file() or (merged / MANIFEST).stat().st_mtime < adapter_time:
        return False
    found = merged_dtype(merged)
    if found != cfg.export_dtype:
        logger.info("%s holds %s weights; a %s GGUF is converted from a %s merge: merging again", merged, found,
                    cfg.gguf_type, cfg.export_dtype)
        return False
    return True


def merged_dtype(merged: Path) -> str | None:
    """The dtype a merged/ folder's weights were saved in (its config.json), None when unknown."""
    try:
        config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return str(dtype).removeprefix("torch.") if dtype else None


def merge(cfg: Config):
    """The adapter merged into the unquantized base, written to merged/; returns the processor."""
    if cfg.train_quantization_bit or cfg.inference_quantization_bit:
        logger.info("the base model is reloaded unquantized for the merge (the adapter was trained on a %s base); "
                    "the merged weights are %s", f"{cfg.train_quantization_bit}-bit" if cfg.train_quantization_bit
                    else "full-precision", cfg.export_dtype)
    label_map = vlm_label_map(cfg)
    warn_for_vllm(cfg)
    started = time.time()
    cfg.inference_quantization_bit = None  # merge into real weights, never into dequantized 4/8-bit ones
    if cfg.export_dtype in ("float32", "float16") and cfg.dtype != "float32":
        # Merged in bfloat16 (a GPU's auto dtype), the sum would keep 8 mantissa bits whatever it is saved as.
        if cfg.dtype != "auto":
            logger.info("merging in float32, then saving %s: a %s merge would be less precise than the export",
                        cfg.export_dtype, cfg.dtype)
        cfg.dtype = "float32"
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
        if label_map is not None:
            (tmp / "response_schema.json").write_text(json.dumps(label_schema(label_map), ensure_ascii=False,
                                                                 indent=1), encoding="utf-8")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    logger.info("merged model (%s, %.0f MB of weights) written to %s in %.1f s; load it with %s.from_pretrained",
                cfg.export_dtype, size, out, time.time() - started,
                "AutoModelForImageTextToText" if cfg.model_type == "vlm" else "AutoModelForCausalLM")
    logger.info("serve it with vLLM: vllm serve %s   or SGLang: python -m sglang.launch_server --model-path %s%s",
                out, out, "" if label_map is None else
                f"; constrain VLM answers with response_format json_schema from {out / 'response_schema.json'}")
    return processor


# vLLM's accepted --max-lora-rank values (vllm/config/lora.py); its default is 16.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def warn_for_vllm(cfg: Config) -> list[str]:
    """What vLLM refuses in this adapter, when served as a LoRA module (--enable-lora) rather than merged."""
    saved = json.loads((cfg.lora_dir / "adapter_config.json").read_text(encoding="utf-8"))
    notes = []
    if saved.get("modules_to_save"):
        notes.append(f"the adapter trains whole modules ({', '.join(saved['modules_to_save'])[:80]}, e.g. an "
                     "unfrozen vision tower), which vLLM's --enable-lora refuses: serve the merged folder instead")
    rank = int(saved.get("r", 0))
    if rank > 16:
        fits = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
        notes.append(f"LoRA rank {rank} is above vLLM's default --max-lora-rank 16: " +
                     (f"start vLLM with --max-lora-rank {fits}" if fits else
                      f"vLLM allows at most {VLLM_LORA_RANKS[-1]}: serve the merged folder instead"))
    for note in notes:
        logger.warning("for vLLM: %s", note)
    return notes
