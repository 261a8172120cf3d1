"""Command-line entry point: parse flags, build the config, dispatch to a task.

    python main.py --task train      [--config config.yaml] [--KEY VALUE ...]
    python main.py --task evaluate   [--use_original_model]
    python main.py --task inference  [--input FILE --output FILE.jsonl]
    python main.py --task export     (adapter merged into the base: output/<model>/merged/)
    python main.py --task compare    [--input FILE --output FILE.jsonl]   (base and fine-tuned side by side)
    python main.py --task serve      [--host 127.0.0.1 --port 8000]       (OpenAI-compatible API and web page)
    accelerate launch main.py --task train          (several GPUs)

Exit codes: 0 done, 2 a problem the user can fix (one message, no traceback unless --debug),
130 interrupted (training saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import distributed
from config import FIELDS, UserError, add_flags, build_config, read_yaml

logger = logging.getLogger("lora")
# A full disk, a read-only file system or a quota: the user's to fix, said in one line.
_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


def _disk_full(e: BaseException) -> bool:
    """A full disk reported by a library as something other than OSError (safetensors: os error 28)."""
    while e is not None:
        if f"(os error {errno.ENOSPC})" in str(e) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _keep_freed_memory() -> None:
    """Keeps memory the process frees in its heap for reuse (Linux glibc only).

    Why: glibc hands a freed block above its mmap threshold back to the OS, so each training step page-faults the
    tens of MB of activations and pixels it allocates back in, and some steps take twice as long as the rest.
    jemalloc and tcmalloc keep such blocks, which is why PyTorch's CPU tuning guide preloads one of them; the same
    two mallopt settings do it with no library to install."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: other mallopt numbers
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _train(cfg):
    import train

    return train.run(cfg)


def _evaluate(cfg):
    import evaluate

    return evaluate.run(cfg)


def _inference(cfg):
    import inference

    return inference.run(cfg)


def _export(cfg):
    import export

    return export.run(cfg)


def _compare(cfg):
    import compare

    return compare.run(cfg)


def _serve(cfg):
    import serve

    return serve.run(cfg)


# Imported lazily so that `--help` and config errors answer without loading torch.
TASKS = {"train": _train, "evaluate": _evaluate, "inference": _inference, "export": _export, "compare": _compare,
         "serve": _serve}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _OncePerRun(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def setup_logging(level: str) -> None:
    """One handler on the root logger; only rank 0 logs below WARNING under accelerate/torchrun."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes says at every start that an optional CPU kernel package is missing: nothing to act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Library warnings go through logging (stderr, our format), so stdout keeps only the answers.
    logging.captureWarnings(True)
    # Raised by the libraries against each other's APIs; the user cannot act on them.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft|accelerate|torch)")
    # bitsandbytes 8-bit on CPU warns on every matmul (hundreds per answer): once per run is enough.
    per_matmul = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OncePerRun) for f in per_matmul.filters):
        per_matmul.addFilter(_OncePerRun())


def parse(argv: list[str] | None, library_checks: bool = True):
    parser = argparse.ArgumentParser(
        prog="main.py", allow_abbrev=False,
        usage="%(prog)s --task {" + ",".join(TASKS) + "} [--config FILE] [--KEY VALUE ...]",
        description="LoRA fine-tuning for LLMs and VLMs: train, evaluate, inference, export (merge), compare, "
                    "serve (OpenAI-compatible API).",
        epilog="Every config.yaml key is also a flag: --KEY VALUE (lists as a,b,c; null for none). "
               "Any other transformers TrainingArguments field passes through to the Trainer (--optim "
               "adamw_torch_fused --max_steps 50). Precedence: defaults < config file < flags.")
    parser.add_argument("--task", choices=list(TASKS), metavar="{" + ",".join(TASKS) + "}",
                        help="required: what to run")
    parser.add_argument("--config", default=None, help="YAML config file (default: config.yaml)")
    add_flags(parser, library_help=bool({"-h", "--help"} & set(sys.argv[1:] if argv is None else argv)))
    args, unknown = parser.parse_known_args(argv)
    problems, extra = [], {}
    i = 0
    while i < len(unknown):  # flags that are not config keys: TrainingArguments fields, or typos
        item = unknown[i]
        if item.startswith("--"):
            key, eq, value = item[2:].partition("=")
            if not eq:
                has_value = i + 1 < len(unknown) and not unknown[i + 1].startswith("--")
                value = unknown[i + 1] if has_value else "true"
                i += has_value
            extra[key] = value
        else:
            problems.append(f"command line: unexpected value {item!r} (flags take the form --key value)")
        i += 1
    cli = {k: v for k, v in vars(args).items() if v is not None and k in FIELDS}
    cli.update(extra)
    if args.task:
        cli["task"] = args.task
    config_path = args.config or "config.yaml"
    raw = read_yaml(config_path, required=args.config is not None)
    cfg = build_config(raw, config_path, cli, problems, library_checks)
    if not cfg.task:
        raise UserError("no task given: add --task " + ", --task ".join(TASKS))
    return cfg


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    setup_logging("info")
    try:
        cfg = parse(argv)
        setup_logging(cfg.log_level)
        if _SPARED:
            logger.debug("not imported (this run cannot use them): %s", ", ".join(_SPARED))
        logger.info("%s", cfg.summary())
        logger.debug("resolved configuration:\n%s", "\n".join(f"  {k}: {v!r}" for k, v in cfg.relevant().items()))
        from tqdm.contrib.logging import logging_redirect_tqdm

        _keep_freed_memory()
        with logging_redirect_tqdm():  # log lines print above progress bars instead of through them
            code = int(TASKS[cfg.task](cfg) or 0)
        distributed.close()
        return code
    except UserError as e:
        if debug:
            logger.exception("error")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        if debug:
            logger.exception("write failed")
        where = f" {e.filename}" if e.filename else ""
        print(f"error: could not write{where}: {e.strerror or e}. Files already complete (lora_model/, results) "
              "are written atomically and were left as they were; free space or choose another --output_dir",
              file=sys.stderr)
        return 2
    except Exception as e:
        if _disk_full(e):  # the safetensors writer raises a plain Exception from Rust: "(os error 28)"
            if debug:
                logger.exception("write failed")
            print("error: could not write: no space left on the device. Files already complete (lora_model/, "
                  "results) are written atomically and were left as they were; free space or choose another "
                  "--output_dir", file=sys.stderr)
            return 2
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(e, torch.OutOfMemoryError):
            raise
        if debug:
            logger.exception("out of memory")
        print("error: out of GPU memory. Lower per_device_train_batch_size (raise gradient_accumulation_steps to "
              "keep the effective batch), set gradient_checkpointing: true, train_quantization_bit: 4, a smaller "
              "max_length or image_max_pixels; for evaluate/inference lower per_device_eval_batch_size or "
              "max_new_tokens", file=sys.stderr)
        return 2


def unused_libraries(cfg) -> list[str]:
    """Installed optional libraries this run cannot use: transformers imports each whenever it is installed.
    bitsandbytes, and datasets with pandas and pyarrow: a run that quantizes nothing (no 4/8-bit key, no 8-bit or
    paged optimizer, a base model without a quantization_config) and reads no hub dataset goes without them.
    scipy (with scikit-learn, which needs it): only evaluate's metrics use them; transformers imports scipy for
    object-detection losses. torchvision: image processing, for VLMs only. Unknown cases (a hub name, a .gguf)
    keep bitsandbytes."""
    unused = []
    optim = str(cfg.trainer_args.get("optim", ""))
    config_file = Path(cfg.model_name_or_path) / "config.json"
    try:
        quantized_base = "quantization_config" in json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        quantized_base = True
    if not (cfg.train_quantization_bit or cfg.inference_quantization_bit or quantized_base
            or any(word in optim for word in ("bnb", "8bit", "paged"))):
        unused.append("bitsandbytes")
    if not cfg.dataset_name:
        unused.append("datasets")
    if cfg.task in ("train", "inference", "export", "serve"):
        unused += ["scipy", "sklearn"]
    if cfg.model_type == "llm":
        unused.append("torchvision")
    return unused


def _spare_unused_imports(argv: list[str]) -> None:
    """For a command-line run only (a process of its own): in a notebook or a test the libraries may be needed
    later in the same process. LORA_IMPORT_ALL=1 turns this off."""
    if os.environ.get("LORA_IMPORT_ALL") == "1" or {"-h", "--help"} & set(argv):
        return
    try:  # silent: the real parse below reports any problem
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cfg = parse(argv, library_checks=False)
    except (UserError, SystemExit):
        return
    for name in unused_libraries(cfg):
        if name not in sys.modules:
            sys.modules[name] = None  # `import name` raises ImportError; find_spec says "not installed"
            _SPARED.append(name)


_SPARED: list[str] = []  # what _spare_unused_imports left out, logged once logging is set up


if __name__ == "__main__":
    _spare_unused_imports(sys.argv[1:])
    sys.exit(main())
