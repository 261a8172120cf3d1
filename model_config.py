"""Base-model loading, device/dtype, quantization, LoRA attach and adapter loading, for every task.

Used by:
    python main.py --task train       load_base(cfg, "train") + attach_lora(model, cfg)
    python main.py --task evaluate    load_base(cfg, "inference") + load_adapter(model, cfg)
    python main.py --task inference   same as evaluate; --use_original_model skips the adapter

LLM and VLM differ only in the Auto class and the processor (AutoTokenizer vs AutoProcessor); LoRA on a VLM
goes to the language model unless `lora_on_vision` is set.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import time
from pathlib import Path

import torch
from torch import nn

from config import Config, UserError
from model_resolver import resolve_model
from vision_tower import patch_embedding_as_matmul

logger = logging.getLogger(__name__)

# Standard (Llama/Qwen) names -> what other architectures call the same projection.
MODULE_ALIASES = {
    "q_proj": ["c_attn", "query_key_value", "Wqkv", "qkv_proj", "query", "q"],
    "k_proj": ["c_attn", "query_key_value", "Wqkv", "qkv_proj", "key", "k"],
    "v_proj": ["c_attn", "query_key_value", "Wqkv", "qkv_proj", "value", "v"],
    "o_proj": ["out_proj", "c_proj", "dense", "o"],
    "gate_proj": ["w1", "c_fc"],
    "up_proj": ["fc1", "c_fc", "w3", "dense_h_to_4h"],
    "down_proj": ["fc2", "c_proj", "w2", "dense_4h_to_h"],
}
VISION_PATTERN = r"(visual|vision_tower|vision_model|image_encoder)"


# ----------------------------------------------------------------------------------------------------
# device and dtype
def resolve_device(cfg: Config):
    """-> (device_map for from_pretrained, the torch.device inputs go to)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return {"": "cpu"}, torch.device("cpu")
    if cfg.device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("`device` = 'mps' but Apple's MPS back end is not available here; use --device cpu "
                            "or --device auto")
        return {"": "mps"}, torch.device("mps")
    if not torch.cuda.is_available():
        raise UserError(f"`device` = {cfg.device!r} but no CUDA GPU is visible here; use --device cpu or --device auto")
    if local_rank >= 0:  # accelerate/torchrun: one full copy per process
        return {"": local_rank}, torch.device(f"cuda:{local_rank}")
    if cfg.device == "auto":
        if torch.cuda.device_count() > 1:
            logger.info("device auto: spreading the model over %d GPUs", torch.cuda.device_count())
            return "auto", torch.device("cuda:0")
        return {"": 0}, torch.device("cuda:0")
    index = int(cfg.device.split(":")[1])
    if index >= torch.cuda.device_count():
        raise UserError(f"`device` = {cfg.device!r} but only {torch.cuda.device_count()} GPU(s) are visible; "
                        "use cuda:0, auto or cpu")
    return {"": index}, torch.device(cfg.device)


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """auto: bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU. Half precision on CPU -> fp32."""
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = getattr(torch, cfg.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("dtype float16 is slow and unstable on CPU; using float32 instead")
        return torch.float32
    return dtype


def quantization_config(bits: int | None, dtype: torch.dtype, cfg: Config):
    """BitsAndBytesConfig for 4/8-bit loading; the vision tower and lm_head stay in `dtype`."""
    if bits is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes") from None
    skip = ["lm_head"]
    if cfg.model_type == "vlm":
        # Plain names match by substring in older transformers, the ".*" forms by regex in newer ones.
        towers = ["visual", "vision_tower", "vision_model", "multi_modal_projector"]
        skip += towers + [f".*{t}" for t in towers]
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=skip)


def keep_4bit_differentiable(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its fast kernel at the first eval-mode
    forward (a validation pass, the packing check), for good, and that kernel has no backward: training after it
    gets no gradient through the base layers, silently. Training keeps the differentiable path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ----------------------------------------------------------------------------------------------------
# loading
def load_processor(cfg: Config, source: str, purpose: str):
    """The tokenizer (LLM) or processor (VLM) of `source`, set up as `purpose` ('train' or 'inference') uses it."""
    from transformers import AutoProcessor, AutoTokenizer

    kwargs = dict(trust_remote_code=cfg.trust_remote_code)
    if cfg.model_type == "vlm":
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            raise UserError(f"{cfg.model_name_or_path} has no image processor; is it a VLM? (model_type: vlm)")
        image_processor.size = {"shortest_edge": cfg.image_min_pixels, "longest_edge": cfg.image_max_pixels}
        for attr, value in (("min_pixels", cfg.image_min_pixels), ("max_pixels", cfg.image_max_pixels)):
            if hasattr(image_processor, attr):
                setattr(image_processor, attr, value)
        tokenizer = processor.tokenizer
    else:
        processor = tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Training pads on the right (labels line up); generation pads on the left (prompts end together).
    tokenizer.padding_side = "right" if purpose == "train" else "left"
    return processor


def _fp8_config(source: str, device: torch.device):
    """FP8 checkpoints run as FP8 on GPUs with compute capability >= 8.9, else are dequantized on load."""
    try:
        raw = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config")
    if not qc or qc.get("quant_method") != "fp8":
        return None
    from transformers import FineGrainedFP8Config

    reason = "this device has no FP8 support (needs a GPU of compute capability 8.9+)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        try:  # FP8 matmuls come from a kernel package that transformers fetches from the hub on first use
            from transformers.integrations.finegrained_fp8 import load_finegrained_fp8_kernel

            load_finegrained_fp8_kernel()
            logger.info("FP8 checkpoint: loading FP8 weights, computing (and training LoRA) in the compute dtype")
            return None  # transformers reads the checkpoint's own quantization_config
        except Exception as e:  # noqa: BLE001 - ImportError offline, AttributeError on other versions
            reason = f"FP8 kernels are not available ({str(e).splitlines()[0][:160]})"
    logger.warning("FP8 checkpoint: %s; dequantizing the weights to the compute dtype on load", reason)
    keep = {k: v for k, v in qc.items() if k in ("weight_block_size", "activation_scheme", "modules_to_not_convert")}
    return FineGrainedFP8Config(dequantize=True, **keep)


def refused_pickle(where, e: Exception) -> str:
    """The message for a pickle file that torch's weights_only loading refused, naming the candidate files."""
    folder = Path(where)
    files = sorted(str(p) for ext in ("*.bin", "*.pt", "*.pth", "*.pkl") for p in folder.glob(ext)) \
        if folder.is_dir() else [str(folder)]
    return (f"refused to load {', '.join(files) or folder}: pickled Python objects that safe (weights_only) "
            f"loading does not allow ({str(e).strip().splitlines()[0][:160]}). Use safetensors files, or files "
            "from a source you trust converted to safetensors")


def _check_attention(cfg: Config) -> None:
    if cfg.attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise UserError("attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package "
                            "(pip install flash-attn --no-build-isolation); use sdpa or null instead")


def load_base(cfg: Config, purpose: str):
    """Load the base model and its processor for `purpose` ('train' or 'inference') -> (model, processor)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    _check_attention(cfg)
    source = resolve_model(cfg)
    device_map, device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    bits = cfg.train_quantization_bit if purpose == "train" else cfg.inference_quantization_bit
    quant = quantization_config(bits, dtype, cfg) or _fp8_config(source, device)
    auto_class = AutoModelForImageTextToText if cfg.model_type == "vlm" else AutoModelForCausalLM
    # Safetensors are preferred; a .bin checkpoint goes through torch.load(weights_only=True), never full pickle.
    kwargs = dict(dtype=dtype, device_map=device_map, trust_remote_code=cfg.trust_remote_code)
    from transformers.integrations import is_deepspeed_zero3_enabled  # transformers loads lazily in this module

    if purpose == "train" and is_deepspeed_zero3_enabled():  # the weights load partitioned, onto no one device
        del kwargs["device_map"]
    if quant is not None:
        kwargs["quantization_config"] = quant
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        processor = load_processor(cfg, source, purpose)
        model = auto_class.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError as e:
        raise UserError(refused_pickle(source, e)) from None
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {cfg.model_name_or_path}: {first} Without network, download the "
                        f"weights first (hf download {cfg.model_name_or_path} --local-dir "
                        f"./{Path(cfg.model_name_or_path).name}) and point --model_name_or_path at the "
                        "folder") from None
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            other = "llm" if cfg.model_type == "vlm" else "vlm"
            raise UserError(f"{cfg.model_name_or_path} cannot be loaded as model_type {cfg.model_type}; "
                            f"try --model_type {other}") from None
        raise
    if getattr(model, "hf_quantizer", None) is not None and quant is not None and not bits:
        model = model.to(dtype)  # a dequantized FP8 checkpoint comes back in bf16
    if purpose == "train" and bits == 4:
        keep_4bit_differentiable(model)
    # A training forward keeps no KV cache; the text config of a VLM too, which its language model reads (with a
    # cache, transformers also stops telling packed samples apart by their restarting positions).
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.use_cache = purpose != "train"
    if cfg.model_type == "vlm":
        patch_embedding_as_matmul(model)
    logger.info("loaded %s (%s, %s%s) on %s", cfg.model_name_or_path, type(model).__name__, str(dtype).split(".")[-1],
                f", {bits}-bit" if bits else "", device_map if isinstance(device_map, str) else device)
    return model, processor


# ----------------------------------------------------------------------------------------------------
# LoRA
def linear_module_names(model: nn.Module, include_vision: bool = True) -> list[str]:
    """Leaf names of the layers LoRA can wrap (Linear, GPT-2's Conv1D, bitsandbytes layers), sorted."""
    names = set()
    for full, module in model.named_modules():
        if not include_vision and re.search(VISION_PATTERN, full):
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit"):
            names.add(full.split(".")[-1])
    names.discard("lm_head")
    return sorted(names)


def resolve_target_modules(model: nn.Module, cfg: Config) -> list[str]:
    """Map the configured names onto the architecture's own (GPT-2: q_proj,v_proj -> c_attn)."""
    include_vision = cfg.model_type != "vlm" or cfg.lora_on_vision
    available = linear_module_names(model, include_vision)
    if cfg.target_modules == ["all-linear"]:
        return available
    resolved, unknown, unmatched = [], [], []
    for name in cfg.target_modules:
        if name in available:
            resolved.append(name)
            continue
        alias = next((a for a in MODULE_ALIASES.get(name, []) if a in available), None)
        if alias:
            resolved.append(alias)
            logger.info("target module %s does not exist in %s; using its equivalent %s",
                        name, type(model).__name__, alias)
        elif name in MODULE_ALIASES:
            unmatched.append(name)
        else:
            unknown.append(name)
    if unknown or not resolved:
        raise UserError(f"`target_modules` {unknown or cfg.target_modules} not found in {type(model).__name__}. "
                        f"Its linear layers are: {', '.join(available)} (or use all-linear)")
    if unmatched:
        logger.warning("target modules %s have no equivalent in %s; skipped", unmatched, type(model).__name__)
    return sorted(set(resolved))


def vision_tower_names(model) -> list[str]:
    """Leaf names of the top-level vision modules (Qwen-VL: `visual`)."""
    names = {full.split(".")[-1] for full, _ in model.named_modules()
             if re.fullmatch(VISION_PATTERN, full.split(".")[-1])}
    if not names:
        raise UserError("freeze_vision_tower: false, but no vision tower (visual/vision_tower/vision_model) was found")
    return sorted(names)


def adapter_revision(lora_dir: Path) -> str | None:
    """Which adapter a folder holds now: its weights file's modification time and the start of its SHA-256
    (training replaces the folder whole, so a new adapter is a new revision)."""
    import hashlib

    weights = Path(lora_dir) / "adapter_model.safetensors"
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(weights.stat().st_mtime))
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    except OSError:
        return None
    return f"{stamp}-{digest}"


def attach_lora(model, cfg: Config):
    """Wrap `model` with a trainable LoRA adapter (fp32 weights); prepares k-bit models for training. With
    init_adapter, the adapter starts as that saved one (its own LoRA settings) instead of fresh."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    names = resolve_target_modules(model, cfg)
    width = min((min(getattr(m, "in_features", 0) or 0, getattr(m, "out_features", 0) or 0)
                 for n, m in model.named_modules() if n.split(".")[-1] in names and hasattr(m, "in_features")),
                default=0)
    if width and cfg.lora_r > width:
        raise UserError(f"`lora_r` = {cfg.lora_r} is larger than the narrowest target layer ({width} features) of "
                        f"{type(model).__name__}; a rank above that adds nothing. Use 4 to 64")
    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) \
            or getattr(model, "is_loaded_in_8bit", False):
        compute = model.get_input_embeddings().weight.dtype
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        # PEFT upcasts every non-quantized weight to fp32. For the frozen embedding (and a tied lm_head) that
        # buys nothing and costs the most: 1.2 GB more for Qwen3's 152k x 2048 table. Norms stay fp32.
        emb = model.get_input_embeddings()
        emb.weight.data = emb.weight.data.to(compute)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not emb.weight and not hasattr(out.weight, "quant_state") \
                and out.weight.dtype == torch.float32 and compute != torch.float32:
            out.weight.data = out.weight.data.to(compute)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.model_type == "vlm" and not cfg.lora_on_vision:
        # A regex restricts LoRA to the language model: the same leaf names exist in the vision tower.
        target = rf"^(?!.*{VISION_PATTERN}).*\.({'|'.join(map(re.escape, names))})$"
    else:
        target = names
    conv1d = any(type(m).__name__ == "Conv1D" and n.split(".")[-1] in names for n, m in model.named_modules())
    # An unfrozen vision tower is trained in full; modules_to_save stores it beside the adapter.
    tower = [] if cfg.model_type != "vlm" or cfg.freeze_vision_tower else vision_tower_names(model)
    extra = dict(cfg.lora_args)  # use_dora, use_rslora, ...: validated by LoraConfig at start-up
    tower += list(extra.pop("modules_to_save", None) or [])
    lora = LoraConfig(**cfg.library_values("LoraConfig"), target_modules=target, **{"bias": "none", **extra},
                      task_type="CAUSAL_LM",
                      modules_to_save=tower or None, fan_in_fan_out=conv1d)  # GPT-2's Conv1D stores weights transposed
    if cfg.init_adapter:
        model = _from_adapter(PeftModel, model, cfg)
    else:
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 adapters: fp16 bases train without unscale errors
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA on %s: %d trainable of %d parameters (%.3f%%)", ", ".join(names), trainable, total,
                100 * trainable / max(total, 1))
    return model


def check_init_adapter(cfg: Config) -> None:
    """Before any data or model is read: init_adapter must be an adapter of this base model and label map."""
    if not cfg.init_adapter:
        return
    folder = Path(cfg.init_adapter)
    check_adapter_owner(cfg, folder)
    theirs, ours = folder / SAVED_FILES["label_map_file"], Path(cfg.label_map_file)
    if cfg.model_type == "vlm" and theirs.is_file() and ours.is_file() \
            and _file_contents("label_map_file", theirs) != _file_contents("label_map_file", ours):
        raise UserError(f"init_adapter {folder} was trained with another label map ({theirs}) than "
                        f"label_map_file {ours}: its codes would mean other values; use the same label map")


def _from_adapter(peft_model, model, cfg: Config):
    """The saved adapter at init_adapter, trainable: the retraining of a served adapter on corrections
    (check_init_adapter ran before the data and model were read)."""
    folder = Path(cfg.init_adapter)
    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    for key, name in (("lora_r", "r"), ("lora_alpha", "lora_alpha")):
        if key in getattr(cfg, "cli_keys", ()) and saved.get(name) != getattr(cfg, key):
            logger.warning("`%s` = %r is ignored: init_adapter %s was made with %s = %r", key, getattr(cfg, key),
                           folder, name, saved.get(name))
    try:
        model = peft_model.from_pretrained(model, str(folder), is_trainable=True, autocast_adapter_dtype=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"init_adapter {folder} does not fit {cfg.model_name_or_path}: {str(e)[:300]}") from None
    logger.info("training starts from the adapter in %s (r=%s, alpha=%s), not a fresh one", folder, saved.get("r"),
                saved.get("lora_alpha"))
    return model


def check_adapter_owner(cfg: Config, lora_dir: Path) -> None:
    """Refuse an adapter trained on another base model (it would load wrongly or not at all)."""
    saved = lora_dir / "run_config.yaml"
    if not saved.is_file():
        return
    import yaml

    try:
        owner = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model_name_or_path")
    except yaml.YAMLError:
        return
    if owner and _same_model(owner, cfg.model_name_or_path) is False:
        raise UserError(f"{lora_dir} holds an adapter of another base model ({owner}), not "
                        f"{cfg.model_name_or_path}; use another --output_dir"
                        + (" or --overwrite_output_dir true" if cfg.task == "train" else ""))


def _same_model(a: str, b: str) -> bool:
    """Two existing folders must be the same folder; otherwise (a hub name, or a relative path saved from
    another working directory) the folder names must match, as the output folder's name already does."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return pa.name == pb.name


# Settings that change what the model sees; evaluate/inference take them from the adapter unless given as flags.
TRAINED_SETTINGS = ("system_prompt", "max_length", "instruction", "image_min_pixels", "image_max_pixels")
# VLM files whose contents the adapter was trained with, copied beside it: config key -> file name.
SAVED_FILES = {"prompt_file": "prompt.json", "label_map_file": "label_map.json"}


def _file_contents(key: str, path: Path):
    from data_loading import load_label_map, load_prompt

    return load_prompt(path) if key == "prompt_file" else load_label_map(path)


def save_training_settings(cfg: Config, folder: Path) -> None:
    """run_config.yaml (the resolved config) and, for VLMs, the prompt and label map the adapter was trained with."""
    cfg.save(folder / "run_config.yaml")
    if cfg.model_type == "vlm":
        prompt = _file_contents("prompt_file", Path(cfg.prompt_file))
        (folder / SAVED_FILES["prompt_file"]).write_text(json.dumps({"system_prompt": prompt}, ensure_ascii=False),
                                                         encoding="utf-8")
        label_map = _file_contents("label_map_file", Path(cfg.label_map_file))
        (folder / SAVED_FILES["label_map_file"]).write_text(json.dumps(label_map, ensure_ascii=False, indent=1),
                                                            encoding="utf-8")


def adopt_training_settings(cfg: Config) -> None:
    """Evaluate/inference see prompts as training did: the adapter's saved settings win over config.yaml
    (with a warning naming the key); a command-line flag wins over both."""
    if cfg.use_original_model:
        return
    saved_file = cfg.lora_dir / "run_config.yaml"
    if not saved_file.is_file():
        return
    import yaml

    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        logger.warning("%s is not readable YAML; using the current settings", saved_file)
        return
    cli = getattr(cfg, "cli_keys", frozenset())
    keys = TRAINED_SETTINGS if cfg.model_type == "vlm" else ("system_prompt", "max_length")
    for key in keys:
        if key not in saved or saved[key] == getattr(cfg, key):
            continue
        if key in cli:
            logger.warning("`%s` = %r from the command line; the adapter was trained with %r", key,
                           getattr(cfg, key), saved[key])
            continue
        logger.warning("`%s`: the configuration says %r but the adapter was trained with %r; using the trained "
                       "value (pass --%s to override)", key, getattr(cfg, key), saved[key], key)
        setattr(cfg, key, saved[key])
    for key, name in SAVED_FILES.items() if cfg.model_type == "vlm" else ():
        copy = cfg.lora_dir / name
        if not copy.is_file() or key in cli:
            continue
        current_path = Path(getattr(cfg, key))
        current = _file_contents(key, current_path) if current_path.is_file() else None
        if current != _file_contents(key, copy):
            logger.warning("%s differs from (or lacks) the file the adapter was trained with; using the trained "
                           "copy %s (pass --%s to override)", current_path, copy, key)
            setattr(cfg, key, str(copy))


def require_adapter(cfg: Config) -> None:
    """Fail before the (slow) model load when there is no usable adapter."""
    if not (cfg.lora_dir / "adapter_config.json").is_file():
        raise UserError(f"no trained adapter at {cfg.lora_dir}: run `python main.py --task train` first "
                        "(same --model_name_or_path and --output_dir), or pass --use_original_model")
    check_adapter_owner(cfg, cfg.lora_dir)


def load_adapter(model, cfg: Config):
    """Put the trained adapter from output_dir/<model-name>/lora_model on `model` (for inference)."""
    from peft import PeftModel

    lora_dir = cfg.lora_dir
    require_adapter(cfg)
    try:
        model = PeftModel.from_pretrained(model, str(lora_dir), is_trainable=False)
    except pickle.UnpicklingError as e:
        raise UserError(refused_pickle(lora_dir, e)) from None
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"the adapter in {lora_dir} does not fit {cfg.model_name_or_path}: {str(e)[:300]}") from None
    logger.info("loaded LoRA adapter from %s", lora_dir)
    return model


def load_for_inference(cfg: Config):
    """The model evaluate and inference use: base (+ adapter unless --use_original_model), eval mode."""
    if not cfg.use_original_model:
        require_adapter(cfg)
    model, processor = load_base(cfg, "inference")
    if not cfg.use_original_model:
        model = load_adapter(model, cfg)
    else:
        logger.info("--use_original_model: running the base model without the adapter")
    context = context_length(model)
    if context and cfg.max_new_tokens > context:
        logger.warning("max_new_tokens=%d is more than the model's context length (%d tokens); using %d",
                       cfg.max_new_tokens, context, context)
        cfg.max_new_tokens = context
    model.eval()
    return model, processor


def context_length(model) -> int | None:
    """The most positions the model handles (bounds max_new_tokens: more would only generate forever)."""
    config = getattr(model, "config", None)
    for c in (config, getattr(config, "text_config", None)):
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(c, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None
