"""Start-up: seconds from the command to the first training step, on the offline demo's tiny model.

    python bench/bench_startup.py [--repeats 5]

Each row runs `python main.py --task train --config configs/demo_llm.yaml --max_steps 1` in a fresh process
(the --max_steps flag makes the config check TrainingArguments, as most real runs do) and reads
`seconds_to_first_step` from train_results.json: from the process's start to the Trainer's first step. Rows:
"default" (bitsandbytes and datasets left out when the run cannot use them, main.unused_libraries) and
"all imports" (LORA_IMPORT_ALL=1, every installed library imported as before). Rows are interleaved; medians.
Results: bench/results_cpu_startup.json.
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
ROWS = {"default": {}, "all imports": {"LORA_IMPORT_ALL": "1"}}


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
                runs[name].append(_run(Path(tmp) / f"{name.replace(' ', '_')}-{i}", env))
    table = {name: {"first_step_s_median": statistics.median(r["first_step_s"] for r in rows),
                    "wall_s_median": statistics.median(r["wall_s"] for r in rows), "runs": rows}
             for name, rows in runs.items()}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "repeats": args.repeats, "rows": table}
    (ROOT / "bench" / "results_cpu_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, row in table.items():
        print(f"{name:12s} first step {row['first_step_s_median']:.2f} s   whole command {row['wall_s_median']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
