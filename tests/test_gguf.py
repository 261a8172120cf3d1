"""GGUF out (`--task export --export_format gguf|gguf_lora`), converted by llama.cpp's own converter and checked by
llama.cpp itself (the `llama_cpp` package, built from source: `pip install llama-cpp-python==0.3.36`).

The tiny models here reuse SmolLM2's tokenizer: llama.cpp's converter accepts only tokenizers it knows, and the
other tiny models train their own. Tests that run llama.cpp skip, saying why, where `llama_cpp` is not installed;
the refusals need only the converter scripts (fetched from PyPI into ./models/ once)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from config import build_config
from conftest import ROOT, run_main, write_json
from gguf_export import LLAMA_CPP_PYTHON, ollama_template

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama.cpp's Python package is not installed: pip "
                                     f"install llama-cpp-python=={LLAMA_CPP_PYTHON} (a source build; .ci/run does it)")

CITIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
          ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Greece", "Athens"), ("Cuba", "Havana"),
          ("Norway", "Oslo"), ("Ghana", "Accra")]


def _rows(pairs):
    return [{"text": f"What is the capital of {c}?", "target": f"The capital of {c} is {city}."} for c, city in pairs]


@pytest.fixture(scope="module")
def tiny(smollm2, tmp_path_factory):
    """A tiny Qwen3 with SmolLM2's tokenizer, trained to memorise 8 answers; 4 held out."""
    import tiny_models

    root = tmp_path_factory.mktemp("gguf")
    model = tiny_models.build("qwen3", root / "tiny-qwen3-smol", tokenizer_from=smollm2)
    write_json(root / "data" / "train.json", _rows(CITIES[:8]))
    write_json(root / "data" / "validation.json", _rows(CITIES[8:]))
    args = ["--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path", model, "--tiny_model", "null",
            "--data_dir", root / "data", "--output_dir", root / "out", "--max_new_tokens", "24"]
    assert run_main("--task", "train", *args, "--num_train_epochs", "15", "--eval_strategy", "no",
                    "--save_strategy", "no") == 0
    return root, args, root / "out" / model.name


def _merged_answers(root: Path, merged: Path, prompts: list[str]) -> list[str]:
    """The tool's own greedy answers from the merged Hugging Face folder (transformers)."""
    write_json(root / "prompts.json", prompts)
    out = root / "merged_answers.jsonl"
    assert run_main("--task", "inference", "--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path",
                    merged, "--use_original_model", "--output_dir", root / "merged-run", "--input",
                    root / "prompts.json", "--output", out, "--max_new_tokens", "24") == 0
    return [json.loads(line)["prediction"] for line in out.read_text(encoding="utf-8").splitlines()]


def _llama_answers(gguf: Path, merged: Path, prompts: list[str], lora: Path | None = None) -> list[str]:
    """llama.cpp's greedy answers, from the prompt tokens the tool builds (llama.cpp's tokenizer checked equal)."""
    from transformers import AutoTokenizer

    from data_loading import Example
    from data_processing import prompt_text

    tok = AutoTokenizer.from_pretrained(merged)
    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=512, verbose=False)
    answers = []
    for p in prompts:
        text = prompt_text(tok, Example(prompt=p, target=""), None)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, "llama.cpp tokenises differently"
        out = llm.create_completion(ids, max_tokens=24, temperature=0.0)
        answers.append(out["choices"][0]["text"].strip())
    llm.close()
    return answers


@needs_llama_cpp
def test_f16_and_q8_answers_match_transformers(tiny):
    root, args, run_dir = tiny
    prompts = [r["text"] for r in _rows(CITIES)]  # 8 trained and 4 held out
    assert run_main("--task", "export", *args, "--export_format", "gguf", "--export_dtype", "float32") == 0
    merged, gguf = run_dir / "merged", run_dir / "gguf"
    expected = _merged_answers(root, merged, prompts)
    assert sum(a.startswith("The capital of") for a in expected) >= 8   # a trained model, not noise
    f16 = _llama_answers(gguf / "tiny-qwen3-smol-f16.gguf", merged, prompts)
    assert f16 == expected
    assert run_main("--task", "export", *args, "--export_format", "gguf", "--gguf_type", "q8_0") == 0
    q8 = _llama_answers(gguf / "tiny-qwen3-smol-q8_0.gguf", merged, prompts)
    assert sum(a == b for a, b in zip(q8, expected)) >= 0.9 * len(prompts), (q8, expected)
    # The chat template travels inside the GGUF: llama-server renders the prompt training used.
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoTokenizer

    from data_loading import Example
    from data_processing import prompt_text

    llm = llama_cpp.Llama(model_path=str(gguf / "tiny-qwen3-smol-f16.gguf"), n_ctx=64, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    llm.close()
    rendered = ImmutableSandboxedEnvironment().from_string(template).render(
        messages=[{"role": "user", "content": prompts[0]}], add_generation_prompt=True, enable_thinking=False)
    assert rendered == prompt_text(AutoTokenizer.from_pretrained(merged), Example(prompt=prompts[0], target=""),
                                   None)
    assert json.loads((gguf / ".written.json").read_text()) == [
        "Modelfile", "tiny-qwen3-smol-f16.gguf", "tiny-qwen3-smol-q8_0.gguf"]


def _render_go(template: str, system: str, prompt: str, response: str) -> str:
    """Ollama's Go template, for the subset the Modelfile uses (if/else on .System, three fields)."""
    m = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}(.*)", template, re.S)
    head = (m.group(1) if system else m.group(2)) if m else ""
    tail = m.group(3) if m else template
    text = head + tail
    return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace("{{ .Response }}",
                                                                                          response)


def test_modelfile_template_is_the_training_template(smollm2, tmp_path):
    """Ollama sends what training saw: the Modelfile's template rendered equals the tool's own prompt + answer."""
    from transformers import AutoTokenizer

    from data_loading import Example
    from data_processing import conversation_text, prompt_text
    from gguf_export import ollama_modelfile

    tok = AutoTokenizer.from_pretrained(smollm2)
    template, stops = ollama_template(tok)
    assert stops == ["<|im_end|>"]
    for system in ("", "Answer in one line. 答案用一行。"):
        ex = Example(prompt="Где мой заказ №12?", target="Завтра.", system=system or None)
        assert _render_go(template, system, ex.prompt, ex.target) == conversation_text(tok, ex, None)
        assert conversation_text(tok, ex, None).startswith(prompt_text(tok, ex, None))
    cfg = build_config({"model_name_or_path": str(smollm2), "system_prompt": "Be brief."}, "export")
    text = ollama_modelfile(cfg, tok, "SmolLM2-135M-Instruct-f16.gguf")
    assert "FROM ./SmolLM2-135M-Instruct-f16.gguf\n" in text and 'SYSTEM """Be brief."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    assert "PARAMETER repeat_penalty 1\n" in text            # Ollama's default 1.1 changes greedy answers
    from gguf_export import serve_commands

    server = serve_commands(cfg, [Path("out/m-f16.gguf")], tok)[0]
    assert server == "llama-server -m out/m-f16.gguf --jinja --repeat-penalty 1 --port 8080"   # no thinking kwargs


@needs_llama_cpp
def test_gguf_lora_applies_in_llama_cpp(tiny):
    """The adapter alone as a GGUF LoRA on the converted base answers as the merged model does."""
    root, args, run_dir = tiny
    assert run_main("--task", "export", *args, "--export_format", "gguf_lora") == 0
    gguf = run_dir / "gguf"
    lora, base = gguf / "tiny-qwen3-smol-lora-f16.gguf", gguf / "tiny-qwen3-smol-base-f16.gguf"
    prompts = [r["text"] for r in _rows(CITIES[:8])]
    merged = run_dir / "merged"
    if not merged.is_dir():
        assert run_main("--task", "export", *args, "--export_dtype", "float32") == 0
    expected = _merged_answers(root, merged, prompts)
    with_lora = _llama_answers(base, merged, prompts, lora=lora)
    # The LoRA applied at run time in f16 and the f32 merge round differently: on a tiny model that has half
    # memorised its answers one near-tie may flip (seen once in CI: 7 of 8); the base alone gets <= 2 right.
    assert sum(a == b for a, b in zip(with_lora, expected)) >= 6, (with_lora, expected)
    without = _llama_answers(base, merged, prompts)
    assert sum(a == b for a, b in zip(without, expected)) <= 2   # the base alone has not learnt the answers


@needs_llama_cpp
def test_k_quant_by_llama_cpp_quantizer(tiny):
    _, args, run_dir = tiny
    assert run_main("--task", "export", *args, "--export_format", "gguf", "--gguf_type", "q4_k_m") == 0
    out = run_dir / "gguf" / "tiny-qwen3-smol-q4_k_m.gguf"
    from gguf import GGUFReader

    reader = GGUFReader(str(out))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]   # the f16 step is not kept
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False)
    assert llm.create_completion("The capital of", max_tokens=4, temperature=0)["usage"]["completion_tokens"] > 0
    llm.close()


@needs_llama_cpp
def test_vlm_export_writes_language_model_and_projector(smollm2, tmp_path):
    """Qwen3-VL: the language model and the vision projector (mmproj); llama.cpp reads an image through them."""
    import base64

    from llama_cpp.llama_chat_format import MTMDChatHandler

    import tiny_models

    model = tiny_models.build("qwen3_vl", tmp_path / "tiny-vl-smol", tokenizer_from=smollm2)
    args = ["--config", ROOT / "configs/demo_vlm.yaml", "--model_name_or_path", model, "--tiny_model", "null",
            "--output_dir", tmp_path / "out"]
    assert run_main("--task", "train", *args, "--num_train_epochs", "1", "--save_strategy", "no") == 0
    assert run_main("--task", "export", *args, "--export_format", "gguf") == 0
    gguf = tmp_path / "out" / model.name / "gguf"
    assert sorted(p.name for p in gguf.glob("*.gguf")) == ["mmproj-tiny-vl-smol-f16.gguf", "tiny-vl-smol-f16.gguf"]
    assert not (gguf / "Modelfile").exists()
    handler = MTMDChatHandler(clip_model_path=str(gguf / "mmproj-tiny-vl-smol-f16.gguf"), verbose=False,
                              use_gpu=False)
    llm = llama_cpp.Llama(model_path=str(gguf / "tiny-vl-smol-f16.gguf"), chat_handler=handler, n_ctx=1024,
                          verbose=False)
    image = sorted((ROOT / "data/vlm/images").iterdir())[0]
    url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()

    def prompt_tokens(content):
        out = llm.create_chat_completion(messages=[{"role": "user", "content": content}], max_tokens=2,
                                         temperature=0)
        return out["usage"]["prompt_tokens"]

    text_only = prompt_tokens([{"type": "text", "text": "inspect"}])
    with_image = prompt_tokens([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "inspect"}])
    assert with_image > text_only + 4   # the image became vision tokens through the projector
    llm.close()


def _refused(capsys, *args) -> str:
    """The one-line error of a refused run."""
    capsys.readouterr()
    assert run_main(*args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def test_refusals_before_any_work(models, tiny, tmp_path, capsys):
    """An architecture llama.cpp cannot convert, an unknown tokenizer, a user's file in the way: one clear line
    each, before the merge, and nothing left behind that could load half."""
    _, args, run_dir = tiny
    data = tmp_path / "data"
    write_json(data / "train.json", _rows(CITIES[:4]))
    write_json(data / "validation.json", _rows(CITIES[4:6]))
    for arch, error in (("opt", "cannot convert OPTForCausalLM models to GGUF"),
                        ("qwen3", "does not know this tokenizer")):   # the tiny models' home-made tokenizers
        model = models(arch)
        own = ["--config", ROOT / "configs/demo_llm.yaml", "--tiny_model", "null", "--model_name_or_path", model,
               "--data_dir", data, "--output_dir", tmp_path / "out",
               "--num_train_epochs", "1", "--save_strategy", "no", "--eval_strategy", "no"]
        assert run_main("--task", "train", *own) == 0
        err = _refused(capsys, "--task", "export", *own, "--export_format", "gguf")
        assert error in err and "--export_format hf" in err
        assert not (tmp_path / "out" / model.name / "merged").exists()   # refused before the merge
        assert not (tmp_path / "out" / model.name / "gguf").exists()
    # A file of the user's with the export's name is refused, and kept; a killed run's temporary is removed.
    gguf = run_dir / "gguf"
    gguf.mkdir(exist_ok=True)
    mine = gguf / "tiny-qwen3-smol-bf16.gguf"
    mine.write_bytes(b"my own conversion")
    stale = gguf / ".tiny-qwen3-smol-f16.gguf.abc123.tmp"
    stale.write_bytes(b"half")
    err = _refused(capsys, "--task", "export", *args, "--export_format", "gguf", "--gguf_type", "bf16")
    assert f"{mine} exists and this tool did not write it" in err
    assert mine.read_bytes() == b"my own conversion"
    assert not stale.exists()
    err = _refused(capsys, "--task", "export", *args, "--export_format", "gguf_lora", "--gguf_type", "q4_k_m")
    assert "a LoRA GGUF is written as f32, f16, bf16, q8_0 only" in err
    # DoRA and rsLoRA adapters: llama.cpp's LoRA GGUF holds rank and alpha only, so it would apply them wrongly.
    dora = [*args, "--output_dir", tmp_path / "dora", "--use_dora", "true", "--use_rslora", "true"]
    assert run_main("--task", "train", *dora, "--num_train_epochs", "1", "--save_strategy", "no",
                    "--eval_strategy", "no") == 0
    err = _refused(capsys, "--task", "export", *dora, "--export_format", "gguf_lora")
    assert "a DoRA and rsLoRA adapter, which llama.cpp's LoRA GGUF cannot express" in err
    assert "--export_format gguf (merged)" in err
