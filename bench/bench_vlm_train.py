"""VLM LoRA training: this project against LLaMA-Factory 0.9.5 and the plain recipe, same model, images, LoRA (CPU).

    bash bench/setup_llamafactory.sh            once (LLaMA-Factory in its own virtualenv)
    python bench/bench_vlm_train.py [--sides 448,896,mixed] [--repeat 2] [--rows ours,plain,...] [--json out.json]

Rows, each in its own process, interleaved per round:
  ours          python main.py --task train (configs/demo_vlm_shapes.yaml's data layout, vision tower frozen)
  ours-wN       the same with --dataloader_num_workers N (ours-w0: every sample loaded in the main process)
  ours-nocache  the same with --vision_cache_mb 0: the frozen tower runs, and images are decoded, every epoch
  ours-pack, ours-pad  the same with --packing true / --packing false (ours: the default, packing auto)
  ours-random   --packing false --group_by_length false: padded batches in random order
  plain         the recipe of the transformers/TRL VLM examples: Trainer + PEFT, a collator that renders each batch
                with the processor's chat template and processor(text, images, padding=True), labels = the whole
                sequence with padding and image tokens masked
  llamafactory  llamafactory-cli train, template qwen3_vl_nothink, sharegpt data with the same system prompt,
                images and answers, from bench/.venv-llamafactory, gradient checkpointing off as in the other rows
  llamafactory-ckpt  the same with LLaMA-Factory's default, gradient checkpointing on
All: the tiny random-initialised Qwen3-VL with the Qwen3-VL processor settings (patch 16, merge 2), 96
training images of the shapes demo drawn at each side (448: 196 image tokens, 896: 784), image_min_pixels =
image_max_pixels = side^2 (`mixed`: each image at its own side, 224 to 896 in steps of 32, so 49 to 784 image
tokens, and the bounds 224^2 and 896^2), LoRA r=16 alpha 32 on the language model's linear layers, vision
tower frozen, batch 4, 2 epochs, lr 5e-4 constant, seed 0, float32. Reported: training samples/s (train_runtime of
each), the process's peak RSS, and the validation loss of each adapter on 24 held-out images, scored alike (this
project's encoding, answer tokens, token-weighted). The tiny model makes the step cheap, so the rows measure what
each pipeline adds around it (image loading, processing, collation) rather than the model's arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
LF_VENV = ROOT / "bench" / ".venv-llamafactory"
EPOCHS, BATCH, LR, R = 2, 4, 5e-4, 16
SHAPES = ROOT / "data/vlm_shapes"


MIXED = 0  # --sides mixed: every image at a side of its own


def pixel_bounds(side: int) -> tuple[int, int]:
    """image_min_pixels and image_max_pixels for a side (MIXED: the range its images are drawn in)."""
    return (224 * 224, 896 * 896) if side == MIXED else (side * side, side * side)


def make_images(folder: Path, side: int, per_code: int = 20) -> Path:
    import make_shapes_data

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for shape in range(3):
        for colour in range(2):
            for _ in range(per_code):
                drawn = side or rng.randrange(224, 897, 32)
                make_shapes_data.draw(shape, colour, drawn, rng).save(folder / f"{shape}{colour}_{n:03d}.jpg",
                                                                      quality=90)
                n += 1
    return folder


def build_model(path: Path) -> Path:
    """The tiny random Qwen3-VL, with the real Qwen3-VL processor's bounds (the tiny model's stop at 64 image
    tokens): LLaMA-Factory resizes only within them, so without this its rows would train on 64-token images while
    ours train on the side asked."""
    import tiny_models

    corpus = tiny_models.default_corpus() + [(SHAPES / "prompt.json").read_text(encoding="utf-8"),
                                             (SHAPES / "label_map.json").read_text(encoding="utf-8")]
    model = tiny_models.build("qwen3_vl", path, corpus=corpus)
    proc_file = model / "processor_config.json"
    proc = json.loads(proc_file.read_text())
    proc["image_processor"]["size"] = {"shortest_edge": 65536, "longest_edge": 16777216}
    proc_file.write_text(json.dumps(proc, indent=2))
    return model


def settings(model: Path, images: Path, side: int, out: Path) -> dict:
    """This project's keys for every row's settings (on top of configs/demo_vlm_shapes.yaml)."""
    return dict(model_name_or_path=model, tiny_model=None, image_dir=images, output_dir=out,
                image_min_pixels=pixel_bounds(side)[0], image_max_pixels=pixel_bounds(side)[1], max_length=2048,
                freeze_vision_tower=True,
                num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, learning_rate=LR, lora_r=R,
                lora_alpha=2 * R, validation_split=0.2, save_strategy="no", eval_strategy="no", seed=0,
                dtype="float32")


def _cfg(model: Path, images: Path, side: int, out: Path):
    from config import build_config, read_yaml

    raw = read_yaml(ROOT / "configs/demo_vlm_shapes.yaml", required=True)
    raw.update({k: str(v) if isinstance(v, Path) else v for k, v in settings(model, images, side, out).items()})
    return build_config(raw, "bench")


def run_ours(model: Path, images: Path, side: int, out: Path, extra: tuple = ()) -> dict:
    args = [sys.executable, str(ROOT / "main.py"), "--task", "train", "--config",
            str(ROOT / "configs/demo_vlm_shapes.yaml"), *extra]
    for key, value in settings(model, images, side, out).items():
        args += [f"--{key}", "null" if value is None else str(value).lower() if isinstance(value, bool) else value]
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit("ours failed:\n" + proc.stderr[-3000:])
    res = json.loads((out / model.name / "train_results.json").read_text())
    return {"train_seconds": res["train_runtime"], "samples_per_second": res["train_samples_per_second"],
            "adapter": str(out / model.name / "lora_model"), "split": str(out / model.name / "split.json")}


def run_plain(model: Path, images: Path, side: int, out: Path, split: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments, set_seed

    from data_loading import load_label_map, system_prompt, target_json
    from data_processing import load_image

    cfg = _cfg(model, images, side, out)
    label_map, system = load_label_map(Path(cfg.label_map_file)), system_prompt(cfg)
    set_seed(0)
    processor = AutoProcessor.from_pretrained(model)
    processor.image_processor.size = dict(zip(("shortest_edge", "longest_edge"), pixel_bounds(side)))
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
    lora = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
    net = get_peft_model(net, lora)
    def row(name: str) -> dict:
        answer = target_json(Path(name).name.split("_")[0], label_map)
        return {"image": str(images / name), "messages": [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}

    rows = [row(name) for name in split["train"]]

    def collate(batch):
        texts = [processor.apply_chat_template(r["messages"], tokenize=False) for r in batch]
        enc = processor(text=texts, images=[load_image(r["image"]) for r in batch], return_tensors="pt",
                        padding=True)
        labels = enc["input_ids"].clone()
        labels[(enc["attention_mask"] == 0) | (labels == image_token)] = -100
        enc["labels"] = labels
        return enc

    args = TrainingArguments(output_dir=str(out / "plain"), per_device_train_batch_size=BATCH,
                             num_train_epochs=EPOCHS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                             logging_steps=1000, save_strategy="no", report_to="none", seed=0, use_cpu=True,
                             remove_unused_columns=False, dataloader_num_workers=0)
    res = Trainer(model=net, args=args, train_dataset=rows, data_collator=collate).train().metrics
    net.save_pretrained(out / "adapter")
    return {"train_seconds": res["train_runtime"], "samples_per_second": res["train_samples_per_second"],
            "adapter": str(out / "adapter")}


def run_llamafactory(model: Path, images: Path, side: int, out: Path, split: dict,
                     checkpointing: bool = False) -> dict:
    import yaml

    from data_loading import load_label_map, system_prompt, target_json

    cli = LF_VENV / "bin" / "llamafactory-cli"
    if not cli.is_file():
        raise SystemExit(f"LLaMA-Factory is not installed in {LF_VENV}: run bash bench/setup_llamafactory.sh")
    cfg = _cfg(model, images, side, out)
    label_map, system = load_label_map(Path(cfg.label_map_file)), system_prompt(cfg)
    rows = [{"messages": [{"role": "user", "content": "<image>"},
                          {"role": "assistant", "content": target_json(Path(name).name.split("_")[0], label_map)}],
             "images": [str(images / name)], "system": system} for name in split["train"]]
    data = out / "lf_data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "train.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images", "system": "system"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    settings = dict(model_name_or_path=str(model), stage="sft", do_train=True, finetuning_type="lora",
                    lora_rank=R, lora_alpha=2 * R, lora_dropout=0.0, lora_target="all", freeze_vision_tower=True,
                    dataset="bench", dataset_dir=str(data), template="qwen3_vl_nothink", cutoff_len=2048,
                    image_min_pixels=pixel_bounds(side)[0], image_max_pixels=pixel_bounds(side)[1],
                    output_dir=str(out / "adapter"), overwrite_output_dir=True, per_device_train_batch_size=BATCH,
                    gradient_accumulation_steps=1, num_train_epochs=float(EPOCHS), learning_rate=LR,
                    lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no",
                    report_to="none", seed=0, use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0,
                    preprocessing_num_workers=1, plot_loss=False, trust_remote_code=False,
                    disable_gradient_checkpointing=not checkpointing)
    (out / "lf.yaml").write_text(yaml.safe_dump(settings))
    env = dict(os.environ, HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1", CUDA_VISIBLE_DEVICES="",
               LLAMAFACTORY_VERBOSITY="WARN", PYTHONPATH="")
    proc = subprocess.run([str(cli), "train", str(out / "lf.yaml")], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"llamafactory-cli failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "adapter" / "train_results.json").read_text())
    return {"train_seconds": res["train_runtime"], "samples_per_second": res["train_samples_per_second"],
            "adapter": str(out / "adapter")}


def validation_loss(model: Path, images: Path, side: int, adapter: str, names: list[str]) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from data_loading import Example, load_label_map, target_json
    from data_processing import Collator, Encoder
    from model_config import load_processor

    cfg = _cfg(model, images, side, Path(adapter).parent)
    processor = load_processor(cfg, str(model), "train")  # sized by image_min/max_pixels as training sizes it
    base = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
    net = PeftModel.from_pretrained(base, adapter).eval()
    label_map = load_label_map(Path(cfg.label_map_file))
    enc, collate = Encoder(processor, cfg), Collator(processor)
    samples = [enc(Example(prompt="", target=target_json(Path(n).name.split("_")[0], label_map),
                           image=str(images / n))) for n in names]
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(samples), 4):
            batch = collate(samples[i:i + 4])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += net(**batch).loss.item() * n
            count += n
    return total / count


def child(row: str, model: Path, images: Path, side: int, out: Path, split: str | None) -> None:
    t = time.time()
    if row == "ours" or row.startswith("ours-"):
        extra = {"ours-nocache": ("--vision_cache_mb", "0"), "ours-pack": ("--packing", "true"),
                 "ours-pad": ("--packing", "false"),
                 "ours-random": ("--packing", "false", "--group_by_length", "false")}.get(row, ())
        if row.startswith("ours-w"):
            extra = ("--dataloader_num_workers", row[6:])
        res = run_ours(model, images, side, out, extra)
    elif row == "plain":
        res = run_plain(model, images, side, out, json.loads(Path(split).read_text()))
    else:
        res = run_llamafactory(model, images, side, out, json.loads(Path(split).read_text()),
                               checkpointing=row == "llamafactory-ckpt")
    res["process_seconds"] = time.time() - t
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res["peak_rss_mb"] = round(max(own, kids) / 2**10, 1)
    print("RESULT " + json.dumps(res))


def _run(args: list) -> dict:
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"row {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default="448,896")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--rows", default="ours,plain,llamafactory,llamafactory-ckpt",
                   help="ours first: the others train on its split")
    p.add_argument("--json")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)  # row model images side out split
    p.add_argument("--build", help=argparse.SUPPRESS)            # folder for the tiny model
    p.add_argument("--score", nargs=5, help=argparse.SUPPRESS)   # model images side adapter split
    args = p.parse_args(argv)
    if args.child:
        row, model, images, side, out, split = args.child
        child(row, Path(model), Path(images), int(side), Path(out), None if split == "-" else split)
        return 0
    # The model is built and each adapter scored in processes of their own: a child process's peak RSS starts at
    # this process's RSS when it is started, so this one must stay small for the peak RSS column to be each row's.
    if args.build:
        print("RESULT " + json.dumps({"path": str(build_model(Path(args.build)))}))
        return 0
    if args.score:
        model, images, side, adapter, split = args.score
        names = json.loads(Path(split).read_text())["validation"]
        print("RESULT " + json.dumps({"validation_loss": validation_loss(Path(model), Path(images), int(side),
                                                                         adapter, names)}))
        return 0
    rows = args.rows.split(",")
    if rows[0] != "ours":
        raise SystemExit("--rows: ours comes first (the other rows train on the split it draws)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_vlm_train_"))
    model = Path(_run(["--build", tmp / "tiny-qwen3-vl"])["path"])
    results = {}
    for side in (MIXED if s == "mixed" else int(s) for s in args.sides.split(",")):
        images = make_images(tmp / f"images-{side}", side)
        runs: dict[str, list] = {row: [] for row in rows}
        for k in range(args.repeat):
            ours = _run(["--child", "ours", model, images, side, tmp / f"ours-{side}-{k}", "-"])
            runs["ours"].append(ours)
            for row in rows[1:]:  # the others train on the split this project's run drew
                runs[row].append(_run(["--child", row, model, images, side, tmp / f"{row}-{side}-{k}",
                                       ours["split"]]))
            print(side, k, {row: r[-1]["train_seconds"] for row, r in runs.items()}, file=sys.stderr)
        for row, rounds in runs.items():
            best = sorted(rounds, key=lambda r: r["train_seconds"])[len(rounds) // 2]
            best["validation_loss"] = _run(["--score", model, images, side, best["adapter"],
                                            runs["ours"][0]["split"]])["validation_loss"]
            best["train_seconds_all"] = [round(r["train_seconds"], 2) for r in rounds]
            results[f"{row}-{side}"] = best
    print("\n| row | image | train s (rounds) | samples/s | peak RSS MB | validation loss |")
    print("|---|---|---|---|---|---|")
    for key, r in results.items():
        row, side = key.rsplit("-", 1)
        image = "224-896 (49-784 tokens)" if int(side) == MIXED else f"{side}x{side} ({(int(side) // 32) ** 2} tokens)"
        print(f"| {row} | {image} | {r['train_seconds']:.1f} "
              f"({', '.join(map(str, r['train_seconds_all']))}) | {r['samples_per_second']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['validation_loss']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
