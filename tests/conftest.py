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
