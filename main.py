"""Command-line entry point: parse flags, build the config, dispatch to a task.

    python main.py --task train      [--config config.yaml] [--KEY VALUE ...]
    python main.py --task evaluate   [--use_original_model]
    python main.py --task inference  [--input FILE --output FILE.jsonl]
    accelerate launch main.py --task train          (several GPUs)

Exit codes: 0 done, 2 a problem the user can fix (one message, no traceback unless --debug),
130 interrupted (training saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from config import FIELDS, UserError, _suggest, add_flags, build_config, read_yaml

logger = logging.getLogger("lora")


def _train(cfg):
    import train

    return train.run(cfg)


def _evaluate(cfg):
    import evaluate

    return evaluate.run(cfg)


def _inference(cfg):
    import inference

    return inference.run(cfg)


# Imported lazily so that `--help` and config errors answer without loading torch.
TASKS = {"train": _train, "evaluate": _evaluate, "inference": _inference}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: str) -> None:
    """One handler on the root logger; only rank 0 logs below WARNING under accelerate/torchrun."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="main.py", allow_abbrev=False,
        description="LoRA fine-tuning for LLMs and VLMs: train, evaluate, inference.",
        epilog="Every config.yaml key is also a flag: --KEY VALUE (lists as a,b,c; null for none).")
    parser.add_argument("--task", choices=sorted(TASKS), help="what to run")
    parser.add_argument("--config", default=None, help="YAML config file (default: config.yaml)")
    add_flags(parser)
    args, unknown = parser.parse_known_args(argv)
    problems = []
    for item in unknown:
        if item.startswith("--"):
            key = item[2:].split("=", 1)[0]
            problems.append(f"command line: unknown flag --{key}{_suggest(key)}")
        else:
            problems.append(f"command line: unexpected value {item!r} (flags take the form --key value)")
    if problems:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(problems))
    cli = {k: v for k, v in vars(args).items() if v is not None and k in FIELDS}
    if args.task:
        cli["task"] = args.task
    config_path = args.config or "config.yaml"
    raw = read_yaml(config_path, required=args.config is not None)
    cfg = build_config(raw, config_path, cli)
    if not cfg.task:
        raise UserError("no task given: add --task train, --task evaluate or --task inference")
    return cfg


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    setup_logging("info")
    try:
        cfg = parse(argv)
        setup_logging(cfg.log_level)
        return int(TASKS[cfg.task](cfg) or 0)
    except UserError as e:
        if debug:
            logger.exception("error")
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
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


if __name__ == "__main__":
    sys.exit(main())
