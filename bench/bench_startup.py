"""Start-up: seconds from the command to the first training step, on the offline demo's tiny model.

    python bench/bench_startup.py [--repeats 5]

Each row runs `python main.py --task train --config configs/demo_llm.yaml --max_steps 1` in a fresh process
(the --max_steps flag makes the config check TrainingArguments, as most real runs do) and reads
`seconds_to_first_step` from train_results.json: from the process's start to the Trainer's first step. Rows:
"default" (the libraries the run cannot use left out: main.unused_libraries), "all imports" (LORA_IMPORT_ALL=1,
every installed library imported as before) and "libraries alone": a process that only imports what any LoRA
training step needs (torch, transformers' model classes and Trainer, peft; the same libraries left out) and
reports the seconds since its start. That is the floor: the default row minus it is this project's own start-up
(config, data, model load, Trainer set-up). Rows are interleaved; medians. Results: bench/results_cpu_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = {"default": {}, "all imports": {"LORA_IMPORT_ALL": "1"}, "libraries alone": None}
_FLOOR = """
import sys, time, psutil
sys.path.insert(0, {root!r})
from main import unused_libraries
from config import build_config
for name in unused_libraries(build_config({{"task": "train"}}, "bench", library_checks=False)):
    sys.modules[name] = None
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
import peft
print(time.time() - psutil.Process().create_time())
"""


def _floor() -> dict:
    started = time.time()
    out = subprocess.run([sys.executable, "-c", _FLOOR.format(root=str(ROOT))], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout
    return {"first_step_s": round(float(out.split()[-1]), 2), "wall_s": round(time.time() - started, 2)}


def _run(out: Path, env: dict) -> dict:
    started = time.time()
    subprocess.run([sys.executable, str(ROOT / "main.py"), "--task", "train", "--config", "configs/demo_llm.yaml",
                    "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no"],
                   check=True, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.time() - started
    results = json.loads((out / "tiny-qwen3" / "train_results.json").read_text())
    return {"first_step_s": results["seconds_to_first_step"], "wall_s": round(wall, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _run(Path(tmp) / "warm", {})  # builds ./models/tiny-qwen3 when absent; warms the file cache
        runs = {name: [] for name in ROWS}
        for i in range(args.repeats):
            for name, env in ROWS.items():
                runs[name].append(_floor() if env is None else _run(Path(tmp) / f"{name.replace(' ', '_')}-{i}", env))
    table = {name: {"first_step_s_median": statistics.median(r["first_step_s"] for r in rows),
                    "wall_s_median": statistics.median(r["wall_s"] for r in rows), "runs": rows}
             for name, rows in runs.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    result = {"machine": f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, Python {platform.python_version()}",
              "repeats": args.repeats, "rows": table}
    (ROOT / "bench" / "results_cpu_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, row in table.items():
        print(f"{name:16s} first step {row['first_step_s_median']:.2f} s   whole command {row['wall_s_median']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
