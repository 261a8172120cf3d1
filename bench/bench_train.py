"""Training and generation throughput: this project against the plain recipe and TRL, on one machine.

    python bench/bench_train.py                 all rows (about 4 minutes on 2 CPU cores), table to stdout
    python bench/bench_train.py --json out.json also write the raw numbers
    python bench/bench_train.py --real ./models/SmolLM2-135M-Instruct --rows ours,plain,trl,llamafactory
                                                the same rows on the real SmolLM2 (30 layers, vocabulary 49,152)
                                                and the demo's order messages (data/demo), 1 epoch, max_length 256
    ... --dtype bfloat16                        every row with the frozen model in bfloat16 (default float32)
    bash bench/setup_llamafactory.sh            once, for the llamafactory row (its own virtualenv)

Rows, each in its own process so that peak memory is its own:
  ours   python main.py --task train (dynamic padding, length grouping, answer-only loss)
  plain  HF Trainer + PEFT, every sample padded to max_length, loss on the whole sequence
  trl    TRL SFTTrainer on prompt/completion pairs (its defaults: completion-only loss, dynamic padding)
  llamafactory  LLaMA-Factory 0.9.5 `llamafactory-cli train` (its defaults: answer-only loss, dynamic padding),
         from bench/.venv-llamafactory; skipped, with the reason, when that is not installed
All four: the same tiny random-initialised Qwen3 (4 layers, 256 wide), the same 80 generated QA pairs whose
answers range from ~50 to ~1000 characters, 2 epochs, LoRA r=8 on q_proj/v_proj, batch 4, lr 2e-4,
max_length 512, seed 0, no gradient checkpointing (TRL's and LLaMA-Factory's defaults turn it on; rows measured
before 2026-12-04 ran them with it). "tokens/s" counts real (non-padding) tokens of the training data per second
of training.
Each row's adapter is then scored alike on validation.json (answer tokens, token-weighted loss).
Plus: batched generation against one prompt at a time, and a VLM training row on the demo images.
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

EPOCHS, BATCH, LR, MAX_LEN, R = 2, 4, 2e-4, 512, 8
# Weights and compute of the frozen model in every row: float32, or bfloat16 (--dtype; on CPUs with AVX512-BF16
# or AMX its matrix products run at about twice the float32 rate). The LoRA weights stay float32 in all rows.
DTYPE = os.environ.get("BENCH_DTYPE", "float32")
SENTENCES = ["保持规律的作息很重要。", "每天适量运动可以改善睡眠。", "饮食要均衡，多吃蔬菜和水果。",
             "工作时每隔一小时起来活动一下。", "和家人朋友保持联系能减轻压力。", "睡前少看手机，让大脑放松。",
             "Drink water regularly during the day.", "Plan tomorrow's tasks before you go to bed."]


def _use_real_settings() -> None:
    """Real-model rows: one epoch at max_length 256 keeps the three rows within minutes on 2 CPU cores."""
    global EPOCHS, MAX_LEN
    EPOCHS, MAX_LEN = 1, 256


def make_data(folder: Path, n: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n + 16):  # 16 more for validation.json
        target_chars = int(50 * (20 ** rng.random()))  # log-uniform, 50 .. 1000 characters
        answer = ""
        while len(answer) < target_chars:
            answer += rng.choice(SENTENCES)
        rows.append({"text": f"第{i}个问题：{rng.choice(SENTENCES)}该怎么做？", "target": answer[:target_chars]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(rows[:n], ensure_ascii=False), encoding="utf-8")
    (folder / "validation.json").write_text(json.dumps(rows[n:], ensure_ascii=False), encoding="utf-8")
    return folder


def make_model(path: Path, data: Path) -> Path:
    import tiny_models

    corpus = [r["text"] + r["target"] for r in json.loads((data / "train.json").read_text(encoding="utf-8"))]
    return tiny_models.build("qwen3", path, corpus=corpus + tiny_models.default_corpus(), hidden=256, layers=4)


def real_tokens(model_path: Path, data: Path) -> int:
    """Non-padding tokens of one epoch, as this project's template encodes them (the same text for all rows)."""
    from transformers import AutoTokenizer

    from config import build_config
    from data_loading import load_data_file
    from data_processing import Encoder

    tok = AutoTokenizer.from_pretrained(model_path)
    enc = Encoder(tok, build_config({"max_length": MAX_LEN}, "bench"))
    return sum(len(x["input_ids"]) for x in (enc(e) for e in load_data_file(data / "train.json")) if x)


# ----------------------------------------------------------------------------------------------------
def run_ours(model: Path, data: Path, out: Path) -> dict:
    import main

    args = ["--task", "train", "--config", str(ROOT / "configs/demo_llm.yaml"), "--model_name_or_path", str(model),
            "--tiny_model", "null", "--data_dir", str(data), "--output_dir", str(out), "--num_train_epochs", EPOCHS,
            "--per_device_train_batch_size", BATCH, "--learning_rate", LR, "--max_length", MAX_LEN,
            "--lora_r", R, "--lora_alpha", 2 * R, "--lora_dropout", 0.05, "--target_modules", "q_proj,v_proj",
            "--seed", 0, "--dtype", DTYPE,
            "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", 1000, "--warmup_ratio", 0]
    assert main.main([str(a) for a in args]) == 0
    res = json.loads((out / model.name / "train_results.json").read_text())
    return {"train_seconds": res["train_runtime"], "train_loss": res["train_loss"],
            "adapter": str(out / model.name / "lora_model")}


def _hf_trainer_args(out: Path):
    from transformers import TrainingArguments

    return dict(output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, learning_rate=LR,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no",
                report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0, gradient_checkpointing=False,
                bf16=DTYPE == "bfloat16"), TrainingArguments


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.05,
                                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def run_plain(model_path: Path, data: Path, out: Path) -> dict:
    """The recipe most tutorials show: pad everything to max_length, labels = input_ids."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, default_data_collator

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = json.loads((data / "train.json").read_text(encoding="utf-8"))

    def encode(r):
        text = tok.apply_chat_template([{"role": "user", "content": r["text"]},
                                        {"role": "assistant", "content": r["target"]}], tokenize=False,
                                       enable_thinking=False)
        e = tok(text, max_length=MAX_LEN, truncation=True, padding="max_length")
        e["labels"] = [t if m else -100 for t, m in zip(e["input_ids"], e["attention_mask"])]
        return e

    ds = Dataset.from_list(rows).map(encode, remove_columns=["text", "target"])
    model = _lora(AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, DTYPE)))
    kwargs, TA = _hf_trainer_args(out)
    trainer = Trainer(model=model, args=TA(**kwargs), train_dataset=ds, data_collator=default_data_collator)
    t = time.time()
    res = trainer.train()
    seconds = time.time() - t
    trainer.save_model(str(out / "adapter"))
    return {"train_seconds": seconds, "train_loss": res.training_loss, "adapter": str(out / "adapter")}


def run_trl(model_path: Path, data: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = json.loads((data / "train.json").read_text(encoding="utf-8"))
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["text"]}],
                             "completion": [{"role": "assistant", "content": r["target"]}]} for r in rows])
    model = _lora(AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, DTYPE)))
    kwargs, _ = _hf_trainer_args(out)
    args = SFTConfig(max_length=MAX_LEN, **kwargs)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t = time.time()
    res = trainer.train()
    seconds = time.time() - t
    trainer.save_model(str(out / "adapter"))
    return {"train_seconds": seconds, "train_loss": res.training_loss, "adapter": str(out / "adapter")}


def run_generation(model: Path, data: Path, out: Path) -> dict:
    """32 prompts, 32 new tokens each (EOS suppressed so every row does equal work): batch 8 vs batch 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from config import build_config
    from data_loading import load_data_file
    from generation import generate_batch

    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.suppress_tokens = [tok.eos_token_id]
    examples = load_data_file(data / "train.json")[:32]
    res = {}
    for size in (1, 8):
        cfg = build_config({"max_new_tokens": 32, "per_device_eval_batch_size": size}, "bench")
        t = time.time()
        generate_batch(m, tok, examples, cfg, None)
        res[f"batch{size}_seconds"] = time.time() - t
    res["speedup"] = res["batch1_seconds"] / res["batch8_seconds"]
    return res


def run_vlm(model: Path, data: Path, out: Path) -> dict:
    import main

    args = ["--task", "train", "--config", str(ROOT / "configs/demo_vlm.yaml"), "--model_name_or_path",
            str(out.parent / "tiny-qwen3-vl"), "--output_dir", str(out), "--num_train_epochs", EPOCHS,
            "--save_strategy", "no", "--image_dir", str(ROOT / "data/vlm/images")]
    assert main.main([str(a) for a in args]) == 0
    res = json.loads((out / "tiny-qwen3-vl" / "train_results.json").read_text())
    return {"train_seconds": res["train_runtime"], "samples_per_second": res["train_samples_per_second"]}


def run_llamafactory(model_path: Path, data: Path, out: Path) -> dict:
    """LLaMA-Factory's `llamafactory-cli train` from its own virtualenv (bench/setup_llamafactory.sh), Alpaca
    data, its template for the model, the same settings; answer-only loss (its default, train_on_prompt false)."""
    import resource

    import yaml

    cli = LF_VENV / "bin" / "llamafactory-cli"
    if not cli.is_file():
        raise SystemExit(f"SKIP LLaMA-Factory is not installed in {LF_VENV}: run bash bench/setup_llamafactory.sh")
    model_type = json.loads((model_path / "config.json").read_text())["model_type"]
    template = {"qwen3": "qwen3_nothink", "llama": "smollm2"}[model_type]
    rows = json.loads((data / "train.json").read_text(encoding="utf-8"))
    lf_data = out / "lf_data"
    lf_data.mkdir(parents=True, exist_ok=True)
    (lf_data / "train.json").write_text(json.dumps([{"instruction": r["text"], "input": "", "output": r["target"]}
                                                    for r in rows], ensure_ascii=False), encoding="utf-8")
    (lf_data / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "train.json"}}))
    settings = dict(model_name_or_path=str(model_path), stage="sft", do_train=True, finetuning_type="lora",
                    lora_rank=R, lora_alpha=2 * R, lora_dropout=0.05, lora_target="q_proj,v_proj",
                    dataset="bench", dataset_dir=str(lf_data), template=template, cutoff_len=MAX_LEN,
                    output_dir=str(out / "adapter"), overwrite_output_dir=True, per_device_train_batch_size=BATCH,
                    gradient_accumulation_steps=1, num_train_epochs=float(EPOCHS), learning_rate=LR,
                    lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no",
                    report_to="none", seed=0, use_cpu=True, bf16=DTYPE == "bfloat16", fp16=False,
                    dataloader_num_workers=0, disable_gradient_checkpointing=True,
                    plot_loss=False, trust_remote_code=False)
    (out / "lf.yaml").write_text(yaml.safe_dump(settings))  # (0.9.5 fails to read a .json config)
    env = dict(os.environ, HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1", CUDA_VISIBLE_DEVICES="",
               LLAMAFACTORY_VERBOSITY="WARN", PYTHONPATH="")
    proc = subprocess.run([str(cli), "train", str(out / "lf.yaml")], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"llamafactory-cli failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "adapter" / "train_results.json").read_text())
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
    return {"train_seconds": res["train_runtime"], "train_loss": res["train_loss"], "adapter": str(out / "adapter"),
            "peak_rss_mb_child": round(child, 1)}


def validation_loss(model_path: Path, adapter: str, data: Path) -> dict:
    """The trained adapter's loss on the validation answers, computed alike for every row (this project's
    encoding of the prompt, loss on the answer tokens only, token-weighted)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from config import build_config
    from data_loading import load_data_file
    from data_processing import Collator, Encoder

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    cfg = build_config({"max_length": MAX_LEN}, "bench")
    enc, collate = Encoder(tok, cfg), Collator(tok)
    samples = [enc(e) for e in load_data_file(data / "validation.json")]
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(samples), 8):
            batch = collate(samples[i:i + 8])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
            count += n
    return {"validation_loss": total / count}


RUNNERS = {"ours": run_ours, "plain": run_plain, "trl": run_trl, "llamafactory": run_llamafactory,
           "generation": run_generation, "vlm": run_vlm}
TRAIN_ROWS = ("ours", "plain", "trl", "llamafactory")
LF_VENV = ROOT / "bench" / ".venv-llamafactory"


def one(name: str, model: Path, data: Path, out: Path) -> None:
    """Child process: run one row, print its numbers as JSON on the last line."""
    from outputs import peak_memory_mb

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t = time.time()
    res = validation_loss(model, name, data) if name.startswith("/") else RUNNERS[name](model, data, out)
    res["wall_seconds"] = time.time() - t
    res.update(peak_memory_mb())
    res["peak_rss_mb"] = max(res["peak_rss_mb"], res.pop("peak_rss_mb_child", 0))  # LLaMA-Factory's own process
    print("RESULT " + json.dumps(res))


def _child(name: str, model: Path, data: Path, out: Path) -> dict | str:
    """Run one row (or score one adapter) in its own process -> its numbers, or the reason it was skipped."""
    proc = subprocess.run([sys.executable, __file__, "--one", name, "--model", str(model), "--data", str(data),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    lines = (proc.stdout + proc.stderr).splitlines()
    skip = next((x for x in lines if x.startswith("SKIP ")), None)
    if skip:
        return skip[5:]
    line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"row {name} failed")
    return json.loads(line[7:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)  # a row name, or an adapter folder to score
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rows", default="ours,plain,trl,llamafactory,generation,vlm")
    p.add_argument("--real", help="a real model folder (e.g. ./models/SmolLM2-135M-Instruct): real-shape rows")
    p.add_argument("--json")
    p.add_argument("--no_validation", action="store_true", help="skip scoring each adapter on validation.json")
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds of all rows; each reports its median")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="the frozen model's dtype in every row "
                   "(default float32); adapters are scored in float32 either way")
    args = p.parse_args(argv)
    if args.dtype:
        os.environ["BENCH_DTYPE"] = args.dtype  # the row processes read it at import
        global DTYPE
        DTYPE = args.dtype
    if args.real or os.environ.get("BENCH_REAL"):
        _use_real_settings()
    if args.one:
        one(args.one, Path(args.model), Path(args.data), Path(args.out))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.real:
        os.environ["BENCH_REAL"] = "1"  # the row processes use the same settings
        data = tmp / "data"
        data.mkdir()
        for name in ("train.json", "validation.json"):
            (data / name).write_bytes((ROOT / "data/demo" / name).read_bytes())
        model = Path(args.real).resolve()
    else:
        data = make_data(tmp / "data")
        model = make_model(tmp / "bench-qwen3", data)
    tokens = real_tokens(model, data) * EPOCHS
    results, skipped, runs = {}, {}, {}
    names = args.rows.split(",")
    for name in names:
        if name not in RUNNERS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(RUNNERS)}")
    # Rounds interleave the rows, so that a slow spell of a shared machine touches every row alike; each row
    # reports its median round.
    for round_ in range(args.repeat):
        for name in names:
            if name in skipped:
                continue
            t = time.time()  # the child's wall time includes the Python start and imports, alike for every row
            res = _child(name, model, data, tmp / f"out-{name}-{round_}")
            if isinstance(res, str):
                skipped[name] = res
                print(f"{name}: skipped: {res}", file=sys.stderr)
                continue
            res["process_seconds"] = time.time() - t
            runs.setdefault(name, []).append(res)
            print(f"{name} (round {round_ + 1}): {res}", file=sys.stderr)
    for name, rounds in runs.items():
        key = "train_seconds" if "train_seconds" in rounds[0] else "process_seconds"
        res = sorted(rounds, key=lambda r: r[key])[len(rounds) // 2]
        results[name] = dict(res, rounds=len(rounds), train_seconds_all=[round(r.get(key), 2) for r in rounds])
        if name in TRAIN_ROWS:
            results[name]["tokens_per_second"] = tokens / res["train_seconds"]
            if not args.no_validation:
                scored = _child(res["adapter"], model, data, tmp / "val")
                results[name]["validation_loss"] = scored["validation_loss"]
    print(f"\nreal training tokens ({EPOCHS} epochs): {tokens}\n")
    print("| row | process wall s | train s | real tokens/s | peak RSS MB | train loss | validation loss |")
    print("|---|---|---|---|---|---|---|")
    for name in TRAIN_ROWS:
        if name in results:
            r = results[name]
            times = r["train_seconds_all"]
            spread = f" ({min(times):.1f}-{max(times):.1f})" if r["rounds"] > 1 else ""
            print(f"| {name} | {r['process_seconds']:.1f} | {r['train_seconds']:.1f}{spread} | "
                  f"{r['tokens_per_second']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['train_loss']:.3f} | {r.get('validation_loss', float('nan')):.4f} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | | | | |")
    if "ours" in results:
        for other in TRAIN_ROWS[1:]:
            if other in results:
                o, u = results[other], results["ours"]
                print(f"\nours vs {other}: training throughput {o['train_seconds'] / u['train_seconds']:.2f}x, "
                      f"process wall {o['process_seconds'] / u['process_seconds']:.2f}x")
    if "generation" in results:
        g = results["generation"]
        print(f"\ngeneration, 32 prompts x 32 tokens: one at a time {g['batch1_seconds']:.2f} s, batch 8 "
              f"{g['batch8_seconds']:.2f} s: {g['speedup']:.2f}x")
    if "vlm" in results:
        v = results["vlm"]
        print(f"\nVLM demo training (50 images, 2 epochs): {v['train_seconds']:.1f} s, "
              f"{v['samples_per_second']:.1f} samples/s, peak RSS {v['peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
