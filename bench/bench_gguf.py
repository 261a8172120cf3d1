"""The GGUF round trip on the real demo: SmolLM2-135M-Instruct (GGUF in) -> the demo fine-tune -> GGUF out (f16,
q8_0) -> llama.cpp, against transformers on the same merged model.

    python bench/bench_gguf.py            trains the demo adapter first when absent; needs llama-cpp-python

Each of the 40 held-out order messages of data/demo/validation.json is answered greedily (max 48 new tokens, the
demo's system prompt, one message at a time): by transformers on the merged folder (float32, as the tool runs on
a CPU) and by llama.cpp on each GGUF (create_chat_completion with the template inside the file, as llama-server
does). Reported: exact match against the targets, agreement with transformers, completion tokens/s.
Results: output/SmolLM2-135M-Instruct/bench_gguf.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "demo.yaml"
RUN = ROOT / "output" / "SmolLM2-135M-Instruct"


def _main(*args: str) -> float:
    started = time.time()
    subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(CONFIG), *args], check=True, cwd=ROOT)
    return time.time() - started


def _transformers(merged: Path, system: str, rows: list[dict]) -> tuple[list[str], float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    answers, tokens, seconds = [], 0, 0.0
    for r in rows:
        ids = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": r["text"]}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=stop)[0, ids.shape[1]:]
        seconds += time.perf_counter() - started
        out = out[out != stop]
        tokens += len(out)
        answers.append(tok.decode(out, skip_special_tokens=True).strip())
    return answers, tokens / seconds


def _llama_cpp(gguf: Path, system: str, rows: list[dict]) -> tuple[list[str], float]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    answers, tokens, seconds = [], 0, 0.0
    for r in rows:
        started = time.perf_counter()
        out = llm.create_chat_completion(messages=[{"role": "system", "content": system},
                                                   {"role": "user", "content": r["text"]}],
                                         max_tokens=48, temperature=0.0)
        seconds += time.perf_counter() - started
        tokens += out["usage"]["completion_tokens"]
        answers.append(out["choices"][0]["message"]["content"].strip())
    llm.close()
    return answers, tokens / seconds


def main() -> int:
    import yaml

    system = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))["system_prompt"]
    rows = json.loads((ROOT / "data/demo/validation.json").read_text(encoding="utf-8"))
    if not (RUN / "lora_model" / "adapter_config.json").is_file():
        _main("--task", "train")
    result = {"machine": f"{os.cpu_count()} CPU cores", "prompts": len(rows), "export_s": {}}
    for fmt, kind in (("hf", None), ("gguf", "f16"), ("gguf", "q8_0")):
        extra = ["--gguf_type", kind] if kind else []
        result["export_s"][kind or "merged"] = round(_main("--task", "export", "--export_format", fmt, *extra), 1)
    targets = [r["target"].strip() for r in rows]
    hf, hf_speed = _transformers(RUN / "merged", system, rows)
    result["transformers"] = {"exact_match": sum(a == t for a, t in zip(hf, targets)) / len(rows),
                              "tokens_per_s": round(hf_speed, 1)}
    for kind in ("f16", "q8_0"):
        answers, speed = _llama_cpp(RUN / "gguf" / f"SmolLM2-135M-Instruct-{kind}.gguf", system, rows)
        result[f"llama_cpp_{kind}"] = {
            "exact_match": sum(a == t for a, t in zip(answers, targets)) / len(rows),
            "same_as_transformers": sum(a == b for a, b in zip(answers, hf)) / len(rows),
            "tokens_per_s": round(speed, 1),
            "size_mb": round((RUN / "gguf" / f"SmolLM2-135M-Instruct-{kind}.gguf").stat().st_size / 2**20, 1)}
    print(json.dumps(result, indent=1))
    (RUN / "bench_gguf.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
