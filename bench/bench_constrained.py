"""Constrained JSON decoding on CPU: per-token overhead, batched generation and correctness of the candidate
libraries, on the real SmolLM2-135M-Instruct (vocabulary 49,152) with the schema derived from a label map.

    python bench/bench_constrained.py [--model ./models/SmolLM2-135M-Instruct] [--batch 8] [--tokens 48]
    (the llguidance and lm-format-enforcer rows need: pip install llguidance lm-format-enforcer)

Writes bench/results_constrained.json. BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_loading import load_label_map
    from structured import label_schema, parse_and_check

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    label_map = load_label_map(ROOT / "data" / "vlm" / "label_map.json")
    schema = label_schema(label_map)
    system = "Inspect the described pipe and answer with a JSON object: " + json.dumps(schema["properties"])
    scenes = ["a pipe with a bright jet of gas at night", "a clean pipe in daylight", "dust in the air, day",
              "light beams through a window at night", "a soft cloud beside a pipe", "nothing unusual, night",
              "a high pressure leak in daylight", "ambient dust at night"]
    prompts = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": s}],
                                       tokenize=False, add_generation_prompt=True) for s in scenes[:args.batch]]
    inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run(name, **kw):
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **kw)
        seconds = time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1]:]
        generated = int((new != tok.pad_token_id).sum())
        texts = tok.batch_decode(new, skip_special_tokens=True)
        valid = sum(parse_and_check(t, label_map) is not None for t in texts)
        return {"name": name, "seconds": round(seconds, 3), "tokens": generated,
                "ms_per_token": round(1000 * seconds / max(generated, 1), 2), "valid": f"{valid}/{len(texts)}",
                "sample": texts[0][:120]}

    rows = [run("unconstrained")]
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                             separators=(", ", ": "))
    setup = time.perf_counter() - start
    row = run("xgrammar", logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)])
    row["setup_seconds"] = round(setup, 3)
    rows.append(row)
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as llt

        class Guidance:  # llguidance ships no transformers LogitsProcessor: the documented matcher loop
            def __init__(self):
                self.lltok = llguidance.hf.from_tokenizer(tok)
                self.grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
                self.matchers, self.start = None, None

            def __call__(self, input_ids, scores):
                if self.matchers is None:
                    self.matchers = [llguidance.LLMatcher(self.lltok, self.grammar) for _ in range(len(input_ids))]
                    self.start = input_ids.shape[1]
                elif input_ids.shape[1] > self.start:
                    for m, t in zip(self.matchers, input_ids[:, -1].tolist()):
                        if not m.is_stopped():
                            m.consume_token(t)
                mask = llt.allocate_token_bitmask(len(input_ids), self.lltok.vocab_size)
                for i, m in enumerate(self.matchers):
                    llt.fill_next_token_bitmask(m, mask, i)
                llt.apply_token_bitmask_inplace(scores[:, :self.lltok.vocab_size], mask)
                if scores.shape[1] > self.lltok.vocab_size:
                    scores[:, self.lltok.vocab_size:] = -float("inf")
                return scores

        start = time.perf_counter()
        guidance = Guidance()
        setup = time.perf_counter() - start
        row = run("llguidance", logits_processor=[guidance])
        row["setup_seconds"] = round(setup, 3)
        rows.append(row)
    except ImportError as e:  # optional: pip install llguidance
        rows.append({"name": "llguidance", "error": f"ImportError: {e}"})
    try:
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.integrations.transformers import build_transformers_prefix_allowed_tokens_fn

        start = time.perf_counter()
        fn = build_transformers_prefix_allowed_tokens_fn(tok, JsonSchemaParser(schema))
        setup = time.perf_counter() - start
        row = run("lm-format-enforcer", prefix_allowed_tokens_fn=fn)
        row["setup_seconds"] = round(setup, 3)
    except ImportError as e:  # 0.11.x imports transformers 4's module layout
        row = {"name": "lm-format-enforcer", "error": f"ImportError: {e}"}
    rows.append(row)
    base = rows[0]["ms_per_token"]
    for r in rows:
        if "ms_per_token" in r:
            r["overhead_ms_per_token"] = round(r["ms_per_token"] - base, 2)
        print(json.dumps(r))
    (ROOT / "bench" / "results_constrained.json").write_text(json.dumps(
        {"model": args.model, "batch": args.batch, "max_new_tokens": args.tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
