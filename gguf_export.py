"""GGUF out: the fine-tuned model converted by llama.cpp's own converter, for llama.cpp, llama-server and Ollama.

    python main.py --task export --export_format gguf                  -> output/<model>/gguf/<model>-f16.gguf
                                                                          + Modelfile (Ollama)
    python main.py --task export --export_format gguf --gguf_type q8_0    q8_0 by the converter; q4_k_m and the
                                                                          other k-quants by llama.cpp's quantizer
    python main.py --task export --export_format gguf_lora             -> gguf/<model>-lora-f16.gguf (the adapter
                                                                          alone) + gguf/<model>-base-f16.gguf

The conversion is llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py`, run in a subprocess from the
llama-cpp-python source archive on PyPI (version LLAMA_CPP_PYTHON). The archive is fetched once with
`pip download --no-deps --no-binary :all:` into ./models/ (a copy placed there by hand is used offline) and the
converter unpacked beside it; nothing of llama.cpp is kept in this repository. k-quants need the quantizer
compiled into the `llama_cpp` package (`pip install llama-cpp-python==LLAMA_CPP_PYTHON`, a source build).
A VLM export also writes the vision projector (mmproj-<model>-f16.gguf) for `llama-server --mmproj`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from config import Config, UserError
from outputs import atomic_dir, atomic_file, foreign_files, remove_stale_temporaries

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # the converter and the quantizer come from this release: one llama.cpp commit
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
# The rest of config's gguf_type choices are llama.cpp's quantizer's, from an f16 file
QUANTIZER_TYPES = tuple(t for t in Config.__dataclass_fields__["gguf_type"].metadata["choices"]
                        if t not in CONVERTER_TYPES)
_NEEDED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def gguf_dir(cfg: Config) -> Path:
    return cfg.run_dir / "gguf"


# ----------------------------------------------------------------------------------------------------
# llama.cpp's converter, fetched once
def converter_dir() -> Path:
    """./models/llama.cpp-<version>/: the converter scripts and their gguf-py, unpacked from the source archive."""
    from model_resolver import _exclusive, download_package

    models = Path("models")
    target = models / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with _exclusive(models / f".{target.name}.fetch.lock"):  # two exports starting together fetch once
        if (target / "convert_hf_to_gguf.py").is_file():
            return target
        name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        archive = models / name
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=models) as tmp:
            if not archive.is_file():
                archive = download_package(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", Path(tmp), binary=False,
                                           offline_hint=f"copy {name} into ./models/")
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
            with atomic_dir(target) as dst:
                try:
                    with tarfile.open(archive) as tf:
                        members = [m for m in tf.getmembers() if m.name.startswith(prefix)
                                   and m.name[len(prefix):].startswith(_NEEDED) and (m.isfile() or m.isdir())]
                        for m in members:
                            m.name = m.name[len(prefix):]
                        tf.extractall(dst, members=members, filter="data")
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise UserError(f"{archive}: not a readable llama-cpp-python source archive ({e}); delete it "
                                    "and export again") from None
                if not (dst / "convert_hf_to_gguf.py").is_file():
                    raise UserError(f"{archive} has no vendor/llama.cpp/convert_hf_to_gguf.py; use the source "
                                    f"archive of llama-cpp-python=={LLAMA_CPP_PYTHON}")
    logger.info("llama.cpp's GGUF converter (llama-cpp-python %s) unpacked at %s", LLAMA_CPP_PYTHON, target)
    return target


def _converter(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run one of llama.cpp's converter scripts with the gguf-py it was released with."""
    tools = converter_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tools / "gguf-py"),
                                                                     os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(tools / script), *args]
    logger.debug("running %s", shlex.join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _run_converter(script: str, args: list[str], what: str) -> None:
    """Run a converter script; its last error line becomes a UserError."""
    proc = _converter(script, args)
    if proc.returncode == 0:
        return
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b", ln)),
                 lines[-1] if lines else f"exit status {proc.returncode}")
    hint = "see the line above"
    if "pre-tokenizer was not recognized" in error:
        hint = ("llama.cpp does not know this tokenizer (the tiny demo models train their own); real checkpoints' "
                "tokenizers are known")
    elif "sentencepiece" in error:
        hint = "pip install sentencepiece"
    raise UserError(f"llama.cpp's {script} could not convert {what}: {error[:300]} ({hint}). The merged Hugging "
                    "Face folder (--export_format hf) works with transformers, vLLM and SGLang")


@lru_cache(maxsize=1)
def supported_architectures() -> dict[str, set[str]]:
    """{"TEXT": {...}, "MMPROJ": {...}}: the architectures the pinned converter writes."""
    proc = _converter("convert_hf_to_gguf.py", ["--print-supported-models"])
    found: dict[str, set[str]] = {"TEXT": set(), "MMPROJ": set()}
    section = None
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():  # the list goes to its log (stderr)
        if line.rstrip().endswith("models:"):
            section = line.split()[0]
        elif line.strip().startswith("- ") and section in found:
            found[section].add(line.strip()[2:])
    if not found["TEXT"]:
        raise UserError(f"llama.cpp's converter at {converter_dir()} does not run "
                        f"({(proc.stderr or proc.stdout)[-300:]}); delete that folder and export again")
    return found


# ----------------------------------------------------------------------------------------------------
# checks before any work
def check(cfg: Config, base: Path) -> None:
    """Everything that can refuse the export, before the merge: dependencies, type, architecture."""
    if importlib.util.find_spec("sentencepiece") is None:
        raise UserError("GGUF export needs sentencepiece (llama.cpp's converter imports it): pip install "
                        "sentencepiece")
    if cfg.gguf_type in QUANTIZER_TYPES:
        if cfg.export_format == "gguf_lora":
            raise UserError(f"gguf_type {cfg.gguf_type}: a LoRA GGUF is written as {', '.join(CONVERTER_TYPES)} "
                            "only; use --gguf_type f16 (or q8_0)")
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError(f"gguf_type {cfg.gguf_type} needs llama.cpp's quantizer: pip install "
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON} (it builds from source), or use --gguf_type "
                            "f16 or q8_0, which the converter writes alone")
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    supported = supported_architectures()
    if arch not in supported["TEXT"]:
        raise UserError(f"{base}: llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON}) cannot convert {arch} models to "
                        "GGUF; the merged Hugging Face folder (--export_format hf) serves with transformers, vLLM "
                        "and SGLang")
    if cfg.model_type == "vlm" and arch not in supported["MMPROJ"]:
        raise UserError(f"{base}: llama.cpp converts the language model of {arch} but not its vision projector "
                        "(mmproj), so images could not be read; use --export_format hf")
    with tempfile.TemporaryDirectory(prefix=".gguf.vocab-", suffix=".tmp", dir=cfg.run_dir) as tmp:
        # the converter refuses tokenizers it does not know: find out from the vocabulary alone, in seconds
        _run_converter("convert_hf_to_gguf.py", [str(base), "--vocab-only", "--outfile", str(Path(tmp) / "v.gguf")],
                       f"the tokenizer of {base}")
    if cfg.export_format == "gguf_lora":
        saved = json.loads((cfg.lora_dir / "adapter_config.json").read_text(encoding="utf-8"))
        if saved.get("modules_to_save"):
            raise UserError(f"{cfg.lora_dir}: the adapter trains whole modules ({', '.join(saved['modules_to_save'])})"
                            ", which a GGUF LoRA cannot hold; use --export_format gguf (merged)")
        # llama.cpp's converter reads rank and alpha only: DoRA's magnitudes would be dropped and rsLoRA's
        # alpha / sqrt(r) scale applied as alpha / r. The merge folds either in exactly.
        kinds = [name for key, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if saved.get(key)]
        if kinds:
            raise UserError(f"{cfg.lora_dir}: a {' and '.join(kinds)} adapter, which llama.cpp's LoRA GGUF cannot "
                            "express; use --export_format gguf (merged)")


# ----------------------------------------------------------------------------------------------------
# writing
def _gguf_dir_cleaned(cfg: Config) -> Path:
    """gguf/, without what a killed export left (its temporaries, a check's vocabulary folder); lock held."""
    out = gguf_dir(cfg)
    remove_stale_temporaries(cfg.run_dir, of=out.name)
    remove_stale_temporaries(out)
    return out


def export_merged(cfg: Config, merged: Path, processor) -> list[Path]:
    """The merged model as <model>-<type>.gguf (and the VLM's mmproj), plus an Ollama Modelfile."""
    out = _gguf_dir_cleaned(cfg)
    target = out / f"{cfg.model_name}-{cfg.gguf_type}.gguf"
    written = [_convert_model(merged, target, cfg.gguf_type, f"the merged model {merged}")]
    if cfg.model_type == "vlm":
        mmproj = out / f"mmproj-{cfg.model_name}-f16.gguf"  # the vision tower stays 16-bit, as llama.cpp ships it
        with atomic_file(mmproj) as tmp:
            _run_converter("convert_hf_to_gguf.py", [str(merged), "--mmproj", "--outtype", "f16",
                                                     "--outfile", str(tmp)], f"the vision projector of {merged}")
        written.append(mmproj)
    else:
        with atomic_file(out / "Modelfile") as tmp:
            tmp.write_text(ollama_modelfile(cfg, processor, target.name), encoding="utf-8")
        written.append(out / "Modelfile")
    return written


def export_lora(cfg: Config, base: Path) -> list[Path]:
    """The adapter alone as a GGUF LoRA, and the base it applies to (converted once) for llama-server --lora."""
    out = _gguf_dir_cleaned(cfg)
    lora = out / f"{cfg.model_name}-lora-{cfg.gguf_type}.gguf"
    with atomic_file(lora) as tmp:
        _run_converter("convert_lora_to_gguf.py", ["--base", str(base), "--outtype", cfg.gguf_type,
                                                   "--outfile", str(tmp), str(cfg.lora_dir)],
                       f"the adapter {cfg.lora_dir}")
    base_gguf = out / f"{cfg.model_name}-base-{cfg.gguf_type}.gguf"
    if base_gguf.is_file() and base_gguf.name not in foreign_files(out):
        logger.info("the base model is already converted: %s", base_gguf)
    else:
        _convert_model(base, base_gguf, cfg.gguf_type, f"the base model {base}")
    return [lora, base_gguf]


def _convert_model(source: Path, target: Path, gguf_type: str, what: str) -> Path:
    started = time.time()
    if gguf_type in CONVERTER_TYPES:
        with atomic_file(target) as tmp:
            _run_converter("convert_hf_to_gguf.py", [str(source), "--outtype", gguf_type, "--outfile", str(tmp)], what)
    else:  # the quantizer starts from an f16 file, which is not kept
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, f16 = tempfile.mkstemp(prefix=f".{target.name}.f16.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            with atomic_file(target) as tmp:
                _run_converter("convert_hf_to_gguf.py", [str(source), "--outtype", "f16", "--outfile", f16], what)
                quantize(Path(f16), tmp, gguf_type)
        finally:
            Path(f16).unlink(missing_ok=True)
    logger.info("%s written (%.0f MB) in %.1f s by llama.cpp's converter%s", target, target.stat().st_size / 2**20,
                time.time() - started, "" if gguf_type in CONVERTER_TYPES else " and quantizer")
    return target


def quantize(source: Path, target: Path, gguf_type: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize in the llama_cpp package), f16 -> `gguf_type`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise UserError(f"llama.cpp's quantizer failed on {source} -> {gguf_type} (status {status}); f16 and q8_0 "
                        "need no quantizer")


# ----------------------------------------------------------------------------------------------------
# Ollama and llama-server
_P, _S, _R = "\x01PROMPT\x01", "\x01SYSTEM\x01", "\x01RESPONSE\x01"


def ollama_template(processor) -> tuple[str, list[str]]:
    """The chat template the model was trained with, as an Ollama (Go) template, and its stop strings.

    Rendered from the tool's own prompt builder with placeholders, so Ollama sends exactly the text training
    and `--task inference` use (thinking disabled, the template's default system message included)."""
    from data_loading import Example
    from data_processing import conversation_text, end_of_turn_ids, prompt_text

    def go(text: str) -> str:
        if '"""' in text:
            raise UserError("the chat template writes three double quotes in a row, which an Ollama Modelfile "
                            "cannot hold; serve the GGUF with llama-server instead")
        text = text.replace("{{", "{{ \"{{\" }}")
        return text.replace(_P, "{{ .Prompt }}").replace(_S, "{{ .System }}").replace(_R, "{{ .Response }}")

    bare = prompt_text(processor, Example(prompt=_P, target=_R), None)
    with_system = prompt_text(processor, Example(prompt=_P, target=_R, system=_S), None)
    full = conversation_text(processor, Example(prompt=_P, target=_R), None)
    answer = full[len(bare):] if full.startswith(bare) else _R
    template = go(bare) if _S not in with_system else \
        "{{ if .System }}" + go(with_system) + "{{ else }}" + go(bare) + "{{ end }}"
    template += go(answer if _R in answer else _R)
    tok = getattr(processor, "tokenizer", processor)
    stops = [tok.convert_ids_to_tokens(i) for i in end_of_turn_ids(processor)]
    return template, [s for s in dict.fromkeys(stops) if s]


def ollama_modelfile(cfg: Config, processor, gguf_name: str) -> str:
    from data_loading import system_prompt

    template, stops = ollama_template(processor)
    lines = [f"# Ollama: ollama create {_ollama_name(cfg)} -f Modelfile   (written by `--task export "
             "--export_format gguf`)", f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    system = system_prompt(cfg)
    if system:
        if '"""' in system:
            raise UserError('the system prompt holds three double quotes in a row, which an Ollama Modelfile '
                            'cannot hold; change it or serve with llama-server')
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    # Ollama penalises repeats by default (1.1); the tool's generation does not, nor did training
    lines += [f"PARAMETER temperature {cfg.temperature:g}", "PARAMETER repeat_penalty 1",
              f"PARAMETER num_predict {cfg.max_new_tokens}"]
    return "\n".join(lines) + "\n"


def _ollama_name(cfg: Config) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", cfg.model_name.lower()).strip("-") or "model"


def serve_commands(cfg: Config, files: list[Path], processor) -> list[str]:
    """The commands that serve what was written: llama-server (C++), llama_cpp.server (Python), Ollama."""
    q = shlex.quote
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", processor), "chat_template", None) or ""
    kwargs = " --chat-template-kwargs '{\"enable_thinking\": false}'" if "enable_thinking" in template else ""
    if cfg.export_format == "gguf_lora":
        lora, base = files
        return [f"llama-server -m {q(str(base))} --lora {q(str(lora))} --jinja{kwargs} --repeat-penalty 1 --port 8080"]
    model = files[0]
    mmproj = f" --mmproj {q(str(files[1]))}" if cfg.model_type == "vlm" else ""
    commands = [f"llama-server -m {q(str(model))}{mmproj} --jinja{kwargs} --repeat-penalty 1 --port 8080",
                f"python -m llama_cpp.server --model {q(str(model))} --port 8080"]
    if cfg.model_type != "vlm":
        commands.append(f"cd {q(str(model.parent))} && ollama create {_ollama_name(cfg)} -f Modelfile && "
                        f"ollama run {_ollama_name(cfg)}")
    return commands
