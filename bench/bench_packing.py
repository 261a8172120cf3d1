"""Packing against length grouping against random batches, on a length-skewed text set, through main.py.

    python bench/bench_packing.py                 3 rows x 2 interleaved rounds (about 15 minutes on 2 CPU cores)
    python bench/bench_packing.py --repeat 1 --json out.json

Rows, each `python main.py --task train` in its own process with the same data, model and settings:
  packing   --packing true  (one row per batch, positions restarting per sample: no padding at all)
  grouped   --packing false --group_by_length true   (batches of similar length: little padding)
  random    --packing false --group_by_length false  (random batches padded to their longest sample)
The data: 200 training and 40 validation QA pairs whose encoded length (prompt and answer) is log-uniform over
30-1000 tokens. The model: a random-initialised Qwen3, 4 layers, 256 wide, SDPA attention, float32, LoRA r=8 on
all linear layers, batch 8, 2 epochs, lr 1e-3, seed 0. "tokens/s" counts real (non-padding) tokens of the
training data per second of training (the Trainer's train_runtime); each row's adapter is scored alike on the
validation pairs (bench_train.validation_loss: answer tokens, token-weighted).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_train  # noqa: E402

EPOCHS, BATCH, LR, MAX_LEN, R = 2, 8, 1e-3, 1024, 8
ROWS = {"packing": ["--packing", "true", "--group_by_length", "false"],
        "grouped": ["--packing", "false", "--group_by_length", "true"],
        "random": ["--packing", "false", "--group_by_length", "false"]}


def make_data(folder: Path, tokenizer, n: int = 200, n_val: int = 40, seed: int = 0) -> Path:
    """QA pairs whose encoded length is log-uniform over 30-1000 tokens (this project's template)."""
    from config import build_config
    from data_loading import Example
    from data_processing import Encoder

    rng = random.Random(seed)
    enc = Encoder(tokenizer, build_config({"max_length": MAX_LEN}, "bench"))
    rows = []
    for i in range(n + n_val):
        goal = int(30 * (1000 / 30) ** rng.random())
        text = f"第{i}个问题：{rng.choice(bench_train.SENTENCES)}该怎么做？"
        answer = ""
        while True:  # grow the answer sentence by sentence, then trim it to the goal length
            sample = enc(Example(prompt=text, target=answer or "。"))
            if sample is None or len(sample["input_ids"]) >= goal:
                break
            answer += rng.choice(bench_train.SENTENCES)
        while len(answer) > 1:
            sample = enc(Example(prompt=text, target=answer))
            if sample is not None and len(sample["input_ids"]) <= goal:
                break
            answer = answer[:-1]
        rows.append({"text": text, "target": answer or "好。"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(rows[:n], ensure_ascii=False), encoding="utf-8")
    (folder / "validation.json").write_text(json.dumps(rows[n:], ensure_ascii=False), encoding="utf-8")
    return folder


def train_row(name: str, model: Path, data: Path, out: Path) -> dict:
    args = [sys.executable, str(ROOT / "main.py"), "--task", "train", "--config",
            str(ROOT / "configs/demo_llm.yaml"), "--model_name_or_path", str(model), "--tiny_model", "null",
            "--data_dir", str(data), "--output_dir", str(out), "--num_train_epochs", EPOCHS,
            "--per_device_train_batch_size", BATCH, "--learning_rate", LR, "--max_length", MAX_LEN,
            "--lora_r", R, "--lora_alpha", 2 * R, "--lora_dropout", 0, "--target_modules", "all-linear",
            "--seed", 0, "--dtype", "float32", "--attn_implementation", "sdpa", "--eval_strategy", "no",
            "--save_strategy", "no", "--logging_steps", 1000, "--warmup_ratio", 0, "--lr_scheduler_type", "constant",
            *ROWS[name]]
    t = time.time()
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if proc.returncode:
        raise SystemExit(f"row {name} failed:\n{proc.stderr[-4000:]}")
    res = json.loads((out / model.name / "train_results.json").read_text())
    log = proc.stderr + proc.stdout
    if name == "packing" and "packing: samples of a batch in one row" not in log:
        raise SystemExit("the packing row did not pack:\n" + log[-3000:])
    return {"train_seconds": res["train_runtime"], "train_loss": res["train_loss"],
            "process_seconds": time.time() - t, "adapter": str(out / model.name / "lora_model")}


def padded_tokens(lengths: list[int], name: str) -> int:
    """Tokens the model computes over in one epoch (padding included), estimated as sampling.py does."""
    from sampling import _padding_share

    if name == "packing":
        return sum(lengths)
    share = _padding_share(lengths, BATCH, grouped=name == "grouped")
    return round(sum(lengths) / (1 - share))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds of all rows; each reports its median")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from config import build_config
    from data_loading import load_data_file
    from data_processing import Encoder

    bench_train.MAX_LEN = MAX_LEN  # validation_loss encodes with it
    tmp = Path(tempfile.mkdtemp(prefix="bench_packing_"))
    seed_data = bench_train.make_data(tmp / "seed-data")  # the tokenizer's corpus: the same sentences
    model = bench_train.make_model(tmp / "bench-qwen3", seed_data)
    tok = AutoTokenizer.from_pretrained(model)
    data = make_data(tmp / "data", tok)
    enc = Encoder(tok, build_config({"max_length": MAX_LEN}, "bench"))
    lengths = [len(x["input_ids"]) for x in (enc(e) for e in load_data_file(data / "train.json")) if x]
    tokens = sum(lengths) * EPOCHS
    print(f"{len(lengths)} training samples, {min(lengths)}-{max(lengths)} tokens (median "
          f"{sorted(lengths)[len(lengths) // 2]}), {tokens} real tokens in {EPOCHS} epochs", file=sys.stderr)
    names = args.rows.split(",")
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.repeat):  # interleaved: a slow spell of the machine touches every row alike
        for name in names:
            res = train_row(name, model, data, tmp / f"out-{name}-{round_}")
            runs.setdefault(name, []).append(res)
            print(f"{name} (round {round_ + 1}): {res}", file=sys.stderr)
    results = {}
    for name, rounds in runs.items():
        res = sorted(rounds, key=lambda r: r["train_seconds"])[len(rounds) // 2]
        res = dict(res, rounds=len(rounds), train_seconds_all=[round(r["train_seconds"], 1) for r in rounds],
                   tokens_per_second=tokens / res["train_seconds"],
                   computed_tokens=padded_tokens(lengths, name) * EPOCHS)
        res.update(bench_train._child(res["adapter"], model, data, tmp / "val"))
        results[name] = res
    print(f"\n{len(lengths)} samples of {min(lengths)}-{max(lengths)} tokens, {tokens} real tokens in {EPOCHS} "
          "epochs\n")
    print("| row | train s (rounds) | real tokens/s | tokens computed (padding included) | train loss | "
          "validation loss |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        times = ", ".join(f"{t:.1f}" for t in r["train_seconds_all"])
        print(f"| {name} | {r['train_seconds']:.1f} ({times}) | {r['tokens_per_second']:.0f} | "
              f"{r['computed_tokens']} | {r['train_loss']:.3f} | {r['validation_loss']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
