"""LoRA training with the Hugging Face Trainer.

    python main.py --task train [--config FILE] [--resume_from_checkpoint auto|PATH]
    accelerate launch main.py --task train        (DDP; DeepSpeed/FSDP through accelerate's config)

Writes under output_dir/<model-name>/: checkpoint-N/ (per epoch or save_steps; optimizer, scheduler and RNG
state for resuming), lora_model/ (adapter + processor + run_config.yaml, written atomically),
trainer_state.json, train_results.json (metrics, time, peak memory) and, for VLMs, split.json.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from config import Config, UserError
from data_loading import load_examples
from data_processing import Collator, Encoder, augmentation, build_dataset
from losses import answer_only_loss, fused_answer_loss, fused_loss_backend, unwrap
from metrics import answer_loss, perplexity, plot_loss_curves
from model_config import (
    attach_lora,
    check_adapter_owner,
    check_init_adapter,
    load_base,
    refused_pickle,
    resolve_device,
    resolve_dtype,
    save_training_settings,
)
from model_resolver import resolve_model
from outputs import (
    atomic_dir,
    peak_memory_mb,
    refuse_foreign,
    remove_stale_temporaries,
    reset_peak_memory,
    run_lock,
    write_json,
)
from packing import PackedCollator, has_multimodal_rope, keeps_samples_apart, rope_positions_for_packed_rows
from sampling import LengthGroupedSampler, WeightedSampler, balance, use_grouping
from vision_tower import cache_vision_features, machine_processes, normalise_pixels_on_model

logger = logging.getLogger(__name__)


def run(cfg: Config) -> int:
    """check -> setup (data, model, datasets, trainer) -> fit -> finalize (adapter, metrics)."""
    _check(cfg)
    # Only the main process owns the run folder (accelerate/torchrun start one process per GPU).
    main_process = os.environ.get("RANK", "0") == "0"
    with run_lock(cfg.run_dir, "train") if main_process else contextlib.nullcontext():
        if main_process:
            remove_stale_temporaries(cfg.run_dir)
        state = _setup(cfg)
        result = _fit(state)
        _finalize(state, result)
    return 0


@dataclass
class _Run:
    """What one training run carries from setup to finalize."""

    cfg: Config
    args: TrainingArguments
    resume: str | None
    identity: dict
    processor: object = None
    trainer: _LoraTrainer | None = None
    sharded: bool = False  # weights split across processes (ZeRO-3, FSDP)
    eval_ds: object = None
    packing: bool = False
    features: object = None  # vision_tower.FeatureCache, where the frozen tower's output is kept
    first_step: _FirstStep = field(default_factory=lambda: _FirstStep())
    started: float = field(default_factory=time.time)


def _check(cfg: Config) -> None:
    """Everything that can be refused from the configuration alone, before any data or model is read."""
    _check_gpu_options(cfg)
    _check_sharding(cfg)
    if not cfg.overwrite_output_dir:
        check_adapter_owner(cfg, cfg.lora_dir)
    _check_writable(cfg.run_dir)
    check_init_adapter(cfg)
    refuse_foreign(cfg.lora_dir)  # now, not after training: the adapter folder is replaced whole at the end


def _setup(cfg: Config) -> _Run:
    resume = _resolve_resume(cfg)
    # Built first: under torchrun/accelerate it joins the process group, so the main process can go first below.
    args = _training_arguments(cfg)
    # One writer for the shared files (split.json, a built/fetched/converted model): the main process makes them,
    # the others wait and then read them.
    with args.main_process_first(local=False, desc="data split and model files"):
        examples = load_examples(cfg, for_training=True)  # data errors surface before the model loads
        if not examples["train"]:
            raise UserError("no training samples")
        source = resolve_model(cfg)
    state = _Run(cfg, args, resume, _identity(cfg, source, examples["train"]))
    if resume:  # the identity check, before the model loads
        _check_resume(resume, state.identity)
    reset_peak_memory()
    set_seed(cfg.seed)  # before the model exists: LoRA's initial weights come from this generator
    model, state.processor = load_base(cfg, "train")
    model = attach_lora(model, cfg)
    train_ds, state.eval_ds = _datasets(state, model, examples)
    state.trainer = _trainer(state, model, train_ds)
    return state


def _datasets(state: _Run, model, examples: dict):
    """Tokenised (cached) training and validation sets; packing and the sampler follow from their lengths."""
    cfg, args, processor = state.cfg, state.args, state.processor
    raw = normalise_pixels_on_model(model, processor)
    encoder = Encoder(processor, cfg, raw_pixels=raw)
    cache = cfg.run_dir / "cache"
    train_examples, weights = balance(examples["train"], cfg)
    transform = augmentation(cfg)
    state.features = features = cache_vision_features(model, cfg.vision_cache_mb)
    if features is not None:
        logger.info("vision tower frozen: each image's features are kept after its first pass (up to "
                    "vision_cache_mb=%d MB of this machine's host memory, %d MB for each of its %d training "
                    "processes), so later epochs skip the tower%s", cfg.vision_cache_mb, features.budget // 2**20,
                    machine_processes(), " for validation images (augmented training images change every epoch)"
                    if transform else " and the image decoding")
    with args.main_process_first(local=False, desc="tokenisation cache"):  # built once, then read by the others
        train_ds = build_dataset(Encoder(processor, cfg, transform, raw) if transform else encoder, train_examples,
                                 cache, "train", features=None if transform else features)
        eval_ds = build_dataset(encoder, examples["validation"], cache, "validation", features=features) \
            if examples["validation"] else None
    train_ds.weights = weights
    if not len(train_ds):
        raise UserError(f"every training sample is longer than max_length={cfg.max_length}; raise max_length")
    batch = cfg.per_device_train_batch_size
    state.packing = _use_packing(cfg, model, packed_row=sum(sorted(train_ds.lengths)[-batch:]))
    if weights is None and not state.packing and use_grouping(cfg.group_by_length, train_ds.lengths,
                                                            cfg.per_device_train_batch_size):
        args.train_sampling_strategy = "group_by_length"
    if eval_ds is not None and not len(eval_ds):
        logger.warning("every validation sample is longer than max_length=%d: no validation loss this run "
                       "(raise max_length to get one)", cfg.max_length)
        eval_ds = None
    if eval_ds is None:  # nothing to validate: no evaluations, and the last weights are the adapter
        args.eval_strategy, args.load_best_model_at_end = "no", False
    return train_ds, eval_ds


def _trainer(state: _Run, model, train_ds) -> _LoraTrainer:
    cfg, processor = state.cfg, state.processor
    callbacks = [_ProgressLog(), _RecordIdentity(state.identity), _RisingValidationLoss(), state.first_step]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    multimodal = state.packing and rope_positions_for_packed_rows(model)  # a packed VLM row's rope positions
    trainer = _LoraTrainer(model=model, args=state.args, train_dataset=train_ds, eval_dataset=state.eval_ds,
                           data_collator=PackedCollator(multimodal) if state.packing else Collator(processor),
                           processing_class=getattr(processor, "tokenizer", processor), callbacks=callbacks)
    state.sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    trainer.answer_only = cfg.answer_only_logits and not cfg.use_liger_kernel
    if trainer.answer_only:
        trainer.fused = fused_loss_backend(model, cfg.fused_loss, state.sharded)
        logger.info("loss: answer-only %s", f"fused linear cross-entropy ({trainer.fused})" if trainer.fused
                    else "logits")
    return trainer


def _fit(state: _Run):
    trainer, resume = state.trainer, state.resume
    if resume:
        step = int(str(resume).rstrip("/").rsplit("-", 1)[-1]) if "checkpoint-" in str(resume) else "?"
        logger.info("resuming from %s (global step %s)", resume, step)
    # The objects setup made (model modules, tokenizer, data) are set aside from the garbage collector: the Trainer
    # starts with a full gc.collect() and the collector's own full passes walk every object, a visible share of a
    # short run; frozen, they are skipped, and nothing they hold is freed meanwhile (they live for the run anyway).
    gc.freeze()
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        if trainer.state.global_step > 0:
            logger.warning("interrupted: saving checkpoint-%d; continue with --resume_from_checkpoint auto",
                           trainer.state.global_step)
            trainer._save_checkpoint(trainer.model, trial=None)
            _write_identity(state.cfg.run_dir / f"checkpoint-{trainer.state.global_step}", state.identity)
        raise
    except pickle.UnpicklingError as e:
        raise UserError(refused_pickle(resume, e) + "; resume only checkpoints you wrote yourself, or start fresh "
                        "without --resume_from_checkpoint") from None
    finally:
        gc.unfreeze()


def _finalize(state: _Run, result) -> None:
    """The adapter (the best checkpoint's or the last weights), trainer_state.json, train_results.json, loss.png."""
    cfg, trainer, sharded = state.cfg, state.trainer, state.sharded
    trainer.save_state()  # trainer_state.json in the run folder
    best = trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    if best and trainer.is_world_process_zero():
        last = next((h["eval_loss"] for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        logger.info("adapter: the best checkpoint by validation loss, %s (eval_loss %.4f; the last evaluation's "
                    "%s); --load_best_model_at_end false keeps the last weights", Path(best).name,
                    trainer.state.best_metric, f"{last:.4f}" if last is not None else "?")
    _save_adapter(trainer, state.processor, cfg, sharded)
    loss = None
    if state.eval_ds is not None and cfg.eval_strategy != "no" and (sharded or trainer.is_world_process_zero()):
        # Token-weighted over answer tokens, as in eval_results.json (the Trainer's own eval_loss in
        # trainer_state.json averages per-batch means instead). Sharded weights are gathered layer by layer in
        # the forward pass, a collective step: then every process computes it.
        loss = answer_loss(trainer.model_wrapped if sharded else trainer.model, state.processor, state.eval_ds,
                           cfg.per_device_eval_batch_size)
    if not trainer.is_world_process_zero():
        return
    metrics = dict(result.metrics)
    metrics.update(global_step=trainer.state.global_step, num_train_samples=len(trainer.train_dataset),
                   best_checkpoint=Path(best).name if best else None,
                   train_wall_seconds=round(time.time() - state.started, 2),
                   seconds_to_first_step=state.first_step.seconds, **peak_memory_mb())
    if loss is not None:
        metrics.update(eval_loss=loss, eval_perplexity=perplexity(loss))
    if state.features is not None:  # how often the frozen vision tower ran, and how often its output was reused
        metrics.update(vision_tower_runs=state.features.computed, vision_features_reused=state.features.reused,
                       vision_cache_mb_used=round(state.features.used / 2**20, 1))
    write_json(cfg.run_dir / "train_results.json", metrics)
    plot_loss_curves(trainer.state.log_history, cfg.run_dir / "loss.png")
    logger.info("loss curves: %s", cfg.run_dir / "loss.png")
    logger.info("training done: %d steps in %.1f s, peak memory %s", trainer.state.global_step,
                metrics["train_wall_seconds"], {k: v for k, v in metrics.items() if k.startswith("peak")})



class _NonFiniteLoss(UserError):
    pass


class _LoraTrainer(Trainer):
    """Trainer with three additions: the output layer only where the answer is (answer_only_logits), length
    grouping from lengths we already know (no re-encoding of images to measure them), and a stop at the first
    non-finite loss, before it reaches a checkpoint."""

    answer_only = True
    fused = None  # "torch" / "liger": fused linear cross-entropy in training steps (losses.py)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.answer_only or "labels" not in inputs or self.label_smoother is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The same normalisation Trainer.compute_loss applies to the model's own loss (tokens over the whole
        # accumulated batch when the model takes num_items_in_batch; scaled back up across processes).
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        count = num_items_in_batch if scaled else None
        if self.fused and model.training and not return_outputs:  # evaluation keeps its logits
            loss, outputs = fused_answer_loss(model, inputs, self.fused, count)
        else:
            loss, outputs = answer_only_loss(model, inputs, count)
        if self.args.average_tokens_across_devices and scaled:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "weights", None) is not None:  # balance: weighted
            return WeightedSampler(dataset.weights, seed=self.args.seed)
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(dataset.lengths,
                                        self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        # Sequential always: transformers' length grouping for evaluation measures every sample's length by
        # loading it, which re-encodes every VLM validation image at each evaluation.
        if eval_dataset is None or self.args.world_size > 1:
            return None
        return torch.utils.data.SequentialSampler(eval_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1
            lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler else self.args.learning_rate
            last = _last_complete_checkpoint(Path(self.args.output_dir))
            raise _NonFiniteLoss(
                f"the loss became {loss.item()} at step {step} (learning rate {lr:.3g}); training stopped. "
                f"Last good checkpoint: {last or 'none yet'}. Try a lower --learning_rate, --dtype bfloat16 or "
                "float32 instead of float16, and check the data for empty or broken samples")
        return loss


class _RisingValidationLoss(TrainerCallback):
    """Says so, once, when the validation loss has risen `patience` evaluations in a row (over-fitting, most
    often), naming the best evaluation so far and the settings that act on it."""

    def __init__(self, patience: int = 2):
        self.patience, self.history, self.warned = patience, [], False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or self.warned:
            return
        self.history.append((state.epoch, loss))
        recent = [x for _, x in self.history[-self.patience - 1:]]
        if len(recent) == self.patience + 1 and all(b > a for a, b in zip(recent, recent[1:])):
            best_epoch, best = min(self.history, key=lambda h: h[1])
            self.warned = True
            advice = ("The best checkpoint by validation loss becomes the adapter (load_best_model_at_end)"
                      if getattr(args, "load_best_model_at_end", False) else
                      f"Consider fewer epochs, early_stopping_patience: {self.patience}, or load_best_model_at_end: "
                      "true")
            logger.warning("validation loss has risen %d evaluations in a row (best %.4f at epoch %.2f, now %.4f): "
                           "the model may be over-fitting. %s", self.patience, best, best_epoch or 0, loss, advice)


class _FirstStep(TrainerCallback):
    """Measures the start-up: seconds from the command (the process's start) to the first training step."""

    seconds: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.seconds is None:
            import psutil

            self.seconds = round(time.time() - psutil.Process().create_time(), 2)
            logger.debug("first training step %.2f s after the command", self.seconds)


class _ProgressLog(TrainerCallback):
    """Logs each evaluation loss as one readable line (the progress bar shows the rest)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            logger.info("epoch %.2f step %d: eval_loss %.4f", state.epoch or 0, state.global_step, metrics["eval_loss"])


# On a GPU, SDPA and eager attend over a packed row through a dense block-diagonal mask, (batch x length)^2;
# FlashAttention-2's varlen kernels need none. Up to this many tokens a row's mask stays small (a 4096-token
# row: 16 MB as booleans), and `packing: auto` packs on a GPU without FlashAttention-2 only up to it.
DENSE_MASK_TOKENS = 4096


def _use_packing(cfg: Config, model, packed_row: int | None = None) -> bool:
    """`packing: true` after the measured isolation check (packing.py); `auto` packs where that check passes,
    unless `group_by_length: true` asks for length grouping (faster on SDPA/eager, but it reweights the tokens:
    BENCHMARKS.md). VLMs need multimodal rope positions to pack, and `auto` packs them on FlashAttention-2 only.
    On CUDA `auto` packs on SDPA/eager only where the longest packed row (`packed_row` tokens: the batch's
    longest samples together; None: unknown) stays within DENSE_MASK_TOKENS."""
    if cfg.packing == "false":
        return False
    if cfg.packing == "auto" and cfg.group_by_length == "true":
        logger.info("packing auto: group_by_length: true asks for length-grouped padded batches instead")
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    backend = cfg.attn_implementation or getattr(model.config, "_attn_implementation", None) or "default"
    on_gpu = next(model.parameters()).device.type == "cuda"
    if (cfg.packing == "auto" and on_gpu and backend != "flash_attention_2"
            and (packed_row is None or packed_row > DENSE_MASK_TOKENS)):
        logger.info("packing auto: on a GPU with %s attention a packed row of up to %s tokens would need a dense "
                    "mask of its length squared: padded batches (flash_attention_2 packs without one; packing: "
                    "true packs anyway)", backend, packed_row or "?")
        return False
    if cfg.model_type == "vlm":
        if not has_multimodal_rope(model):
            if cfg.packing == "true":
                raise UserError(f"`packing: true`: {type(unwrap(model)).__name__} has no multimodal rope positions "
                                "(get_rope_index, as in the Qwen2-VL, Qwen2.5-VL and Qwen3-VL family) to number "
                                "the samples of a packed row; set packing: false")
            return False
        if cfg.packing == "auto" and backend != "flash_attention_2":
            # Image tokens make VLM rows long, and SDPA/eager mask a packed row densely (its length squared): no
            # faster than padded batches even with mixed image sizes, slower with equal ones (BENCHMARKS.md).
            logger.info("packing auto: a VLM on %s attention trains in padded batches (as fast as packed rows, "
                        "or faster); packing: true packs it", backend)
            return False
    if is_deepspeed_zero3_enabled():  # weights partitioned since loading: no forward outside the engine
        if backend == "flash_attention_2":
            return True  # varlen kernels cut at restarting positions whatever the model's mask code does
        if cfg.packing == "true":
            raise UserError("`packing: true` under DeepSpeed ZeRO-3 needs attn_implementation: flash_attention_2 "
                            "(with other backends isolation is checked by a forward pass, which partitioned "
                            "weights do not allow); set packing: false or use ZeRO-2 / FSDP")
        return False
    isolated, ratio = keeps_samples_apart(model)
    kind = type(unwrap(model)).__name__
    if not isolated:
        if cfg.packing == "true":
            raise UserError(f"`packing: true`: {kind} with {backend} attention lets packed samples attend to each "
                            f"other (a packed sample's logits moved {ratio:.0%} of the way to a cross-attending "
                            "run); set packing: false")
        logger.info("packing auto: %s with %s attention does not keep packed samples apart: padded batches",
                    kind, backend)
        return False
    logger.info("packing: samples of a batch in one row, kept apart by %s attention (checked: leak %.1e of "
                "cross-attention)", backend, ratio)
    return True


def _check_gpu_options(cfg: Config) -> None:
    if cfg.use_liger_kernel:
        if not torch.cuda.is_available():
            raise UserError("`use_liger_kernel` needs a CUDA GPU; set use_liger_kernel: false")
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise UserError("`use_liger_kernel: true` needs the liger-kernel package: "
                            "pip install liger-kernel") from None
    if cfg.torch_compile and not torch.cuda.is_available():
        logger.warning("torch_compile on a CPU compiles slowly and rarely pays off for short runs")


def _last_complete_checkpoint(run_dir) -> str | None:
    """The newest checkpoint-N that was written to the end (trainer_state.json is written last)."""
    found = []
    for path in run_dir.glob("checkpoint-*") if run_dir.is_dir() else []:
        tail = path.name.rsplit("-", 1)[-1]
        if tail.isdigit():
            found.append((int(tail), path))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        logger.warning("%s is incomplete (the run stopped while writing it); skipping it", path)
    return None


def _resolve_resume(cfg: Config) -> str | None:
    value = cfg.resume_from_checkpoint
    if not value:
        return None
    if value == "auto":
        last = _last_complete_checkpoint(cfg.run_dir)
        if last is None:
            logger.info("resume_from_checkpoint auto: no checkpoint in %s, starting from scratch", cfg.run_dir)
        return last
    if not os.path.isdir(value) or not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise UserError(f"resume_from_checkpoint {value} is not a complete checkpoint folder (no "
                        "trainer_state.json); use auto or a checkpoint-N path")
    return value


def _training_arguments(cfg: Config) -> TrainingArguments:
    _, device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    on_gpu = device.type == "cuda"
    workers = loader_workers(cfg.model_type, on_gpu, os.cpu_count() or 1)
    fields = dict(
        output_dir=str(cfg.run_dir),
        **cfg.library_values("TrainingArguments"),  # num_train_epochs, learning_rate, save_strategy, seed, ...
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value < 1 as a share of the steps
        logging_first_step=True,
        eval_steps=cfg.save_steps if cfg.eval_strategy == "steps" else None,
        data_seed=cfg.seed,
        # Mixed precision follows the base weights; LoRA weights stay fp32 under autocast.
        bf16=dtype == torch.bfloat16,  # autocast on CPU too: k-bit preparation leaves fp32 norms beside bf16
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu and _sharding(cfg) is None,  # accelerate drops DeepSpeed when told use_cpu
        train_sampling_strategy="random",  # length grouping is decided from the data (sampling.py)
        remove_unused_columns=False,
        label_names=["labels"],
        report_to="none",
        dataloader_num_workers=workers,
        dataloader_pin_memory=on_gpu,
        ddp_find_unused_parameters=False if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    if keeps_best(cfg):  # the best checkpoint (by eval_loss unless told otherwise) becomes the adapter
        fields.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    # Every other TrainingArguments field the user set (optim, max_steps, report_to, ...) passes through as is.
    if "warmup_steps" in cfg.trainer_args:
        logger.info("warmup: %s optimizer steps (warmup_steps), in place of warmup_ratio",
                    cfg.trainer_args["warmup_steps"])
    fields.update(cfg.trainer_args)
    # Workers not forked again every epoch (DataLoader refuses the option without workers).
    fields.setdefault("dataloader_persistent_workers", fields["dataloader_num_workers"] > 0)
    return TrainingArguments(**fields)


def loader_workers(model_type: str, on_gpu: bool, cpus: int) -> int:
    """Data-loading processes: VLM samples are decoded and processed when drawn, a share of a GPU step worth
    overlapping (BENCHMARKS.md, bench/bench_vlm_pipeline.py); on a CPU the model's step dwarfs it and workers would
    take the step's cores. Text is tokenised once, before training."""
    return 2 if model_type == "vlm" and on_gpu and cpus >= 4 else 0


def keeps_best(cfg: Config) -> bool:
    """Whether the checkpoint of the best validation loss becomes the adapter: by default whenever every
    checkpoint falls on an evaluation (a run that over-fits in its last epochs keeps its best state), and always with
    early stopping; `load_best_model_at_end: false` keeps the last epoch's weights."""
    if "load_best_model_at_end" in cfg.trainer_args:
        return bool(cfg.trainer_args["load_best_model_at_end"])
    if cfg.early_stopping_patience:
        return True
    eval_steps = cfg.trainer_args.get("eval_steps") or cfg.save_steps
    # The Trainer's own condition for load_best_model_at_end: each save falls on an evaluation.
    return cfg.eval_strategy != "no" and cfg.eval_strategy == cfg.save_strategy and (
        cfg.save_strategy != "steps" or cfg.save_steps % eval_steps == 0)


def _save_adapter(trainer: Trainer, processor, cfg: Config, sharded: bool) -> None:
    """lora_model/ is written to a temporary folder and renamed: never half-written. Under ZeRO-3 and FSDP each
    process holds a shard of the weights: every process takes part in gathering the full state dict (as
    Trainer.save_model does), then the main process writes the LoRA weights from it."""
    state_dict = None
    if sharded:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped if trainer.is_deepspeed_enabled
                                                        else trainer.model)
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_dir(cfg.lora_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(tmp)
        save_training_settings(cfg, tmp)
    logger.info("adapter saved to %s", cfg.lora_dir)


IDENTITY = "run_identity.json"  # in each checkpoint: which base model and training data it belongs to


def _identity(cfg: Config, source: str, examples: list) -> dict:
    """The base model (resolved path and a hash of its config) and a hash of the training set."""
    path = Path(source)
    config_sha = None
    if (path / "config.json").is_file():
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            raw.pop(volatile, None)
        config_sha = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    data = hashlib.sha256(json.dumps([[e.prompt, e.target, e.image, e.system, e.messages] for e in examples])
                          .encode()).hexdigest()[:16]
    return {"base_model": str(path.resolve()) if path.exists() else source, "base_config_sha": config_sha,
            "train_data_sha": data}


class _RecordIdentity(TrainerCallback):
    def __init__(self, identity: dict):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            _write_identity(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.identity)


def _write_identity(checkpoint: Path, identity: dict) -> None:
    if checkpoint.is_dir():
        write_json(checkpoint / IDENTITY, identity)


def _check_resume(resume: str, identity: dict) -> None:
    """Refuse a checkpoint of another base model, or one trained on other data (VLM: images added since)."""
    saved_file = Path(resume) / IDENTITY
    if not saved_file.is_file():
        logger.warning("%s does not record its base model and data (older version, or killed while saving); "
                       "resuming without checking them", resume)
        return
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{saved_file} is damaged; resume from another checkpoint or start fresh") from None
    if saved.get("base_model") != identity["base_model"] or saved.get("base_config_sha") != identity["base_config_sha"]:
        raise UserError(f"{resume} was trained on the base model {saved.get('base_model')} (config "
                        f"{saved.get('base_config_sha')}), not on {identity['base_model']} (config "
                        f"{identity['base_config_sha']}); resuming would mix two models. Start fresh (without "
                        "--resume_from_checkpoint) or use another --output_dir")
    if saved.get("train_data_sha") != identity["train_data_sha"]:
        raise UserError(f"the training data changed since {resume} was saved (LLM: train.json edited; VLM: images "
                        "added or removed, so split.json grew); resuming would continue another data set under the "
                        "checkpoint's schedule. Start fresh without --resume_from_checkpoint, or restore the data")


def _check_writable(run_dir: Path) -> None:
    """Fail now, not after an epoch, when the outputs cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {run_dir}: {e.strerror or e}; choose another --output_dir") from None


def _sharding(cfg: Config) -> str | None:
    """"FSDP" or "DeepSpeed" when accelerate's config (environment) or a TrainingArguments field asks for it."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or cfg.trainer_args.get("fsdp"):
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or cfg.trainer_args.get("deepspeed"):
        return "DeepSpeed"
    return None


def _check_zero3_save(cfg: Config) -> None:
    """ZeRO-3 must gather the 16-bit weights to save the adapter: without it the save fails after the whole run."""
    stage, gather = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), \
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")
    where = "the accelerate config (deepspeed_config: zero3_save_16bit_model: true)"
    ds = cfg.trainer_args.get("deepspeed")
    if ds:
        import json

        try:
            conf = ds if isinstance(ds, dict) else json.loads(Path(ds).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"`deepspeed` {ds}: not a readable DeepSpeed JSON config ({e})") from None
        zero = conf.get("zero_optimization", {})
        stage, gather = str(zero.get("stage", "")), str(zero.get("stage3_gather_16bit_weights_on_model_save", ""))
        where = f"{ds} (zero_optimization: \"stage3_gather_16bit_weights_on_model_save\": true)"
    if stage == "3" and gather.lower() != "true":
        raise UserError(f"DeepSpeed ZeRO-3 without gathering 16-bit weights on save would fail to save the adapter "
                        f"after the whole run; set it in {where}")


def _check_sharding(cfg: Config) -> None:
    """4/8-bit bases train on one GPU or with DDP; FSDP and DeepSpeed shard 16-bit weights, on GPUs. On a CPU,
    accelerate runs DeepSpeed in a single process only (several would each train alone) and FSDP not at all."""
    sharded = _sharding(cfg)
    if sharded and not torch.cuda.is_available():
        if sharded == "FSDP" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(f"{sharded} across processes needs CUDA GPUs (on a CPU accelerate would run each "
                            "process alone, or plain DDP); on a CPU drop it and run DDP (torchrun --nproc_per_node "
                            "N main.py --task train)")
        logger.warning("DeepSpeed on a CPU runs in this one process: it shards nothing and saves no memory here")
    if sharded == "DeepSpeed":
        _check_zero3_save(cfg)
    if sharded and cfg.train_quantization_bit:
        raise UserError(f"train_quantization_bit: {cfg.train_quantization_bit} with {sharded} is not supported "
                        "here: 4/8-bit bases train on one GPU or with DDP (configs/accelerate/ddp.yaml). Set "
                        "train_quantization_bit: null to shard a 16-bit model instead")
