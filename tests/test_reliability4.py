"""Reliability, round four: what users type (numbers as YAML and the shell give them, the seed's own config) and
what clients send (a server that survives any request), the export's precision, the run lock, and defaults that
hurt on a real machine. Servers run as processes on loopback ports, driven by the official `openai` client and
httpx; every request loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import yaml

from conftest import ROOT, run_cli, run_main, small_llm_data, write_json
from serving import Server

SEED_README = ROOT.parent / "shared" / "seed" / "README.seed.md"


def _no_traceback(proc) -> str:
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]
    return err


# ----------------------------------------------------------------------------------------------------
# 1. numbers as users type them
def test_numbers_in_yaml_and_flags_parse_as_numbers(tmp_path):
    """YAML 1.1 reads 5e-4 (no dot) as text: the seed's own learning_rate. Flags give text too."""
    (tmp_path / "c.yaml").write_text("learning_rate: 5e-4\nweight_decay: 1E-2\ntemperature: 1e-3\n"
                                     "max_length: 1e3\nlora_dropout: 5e-2\n", encoding="utf-8")
    proc = run_cli("--task", "train", "--config", tmp_path / "c.yaml", "--data_dir", tmp_path / "none",
                   "--output_dir", tmp_path / "out", "--model_name_or_path", tmp_path / "m", "--max_steps", "1e1",
                   "--adam_beta1", "9E-1", "--warmup_steps", "2e0")
    err = _no_traceback(proc)
    assert proc.returncode == 2 and "train.json not found" in err   # the data, not the config, stops it
    assert "lr 0.0005" in err and "max_length 1000" in err
    proc = run_cli("--task", "train", "--config", tmp_path / "c.yaml", "--data_dir", tmp_path / "none",
                   "--model_name_or_path", tmp_path / "m", "--learning_rate", "2E-4")
    assert "lr 0.0002" in _no_traceback(proc)


def test_bad_numbers_are_one_error_naming_each_key(tmp_path):
    (tmp_path / "c.yaml").write_text("seed: 1180591620717411303424\nnum_train_epochs: .inf\n", encoding="utf-8")
    proc = run_cli("--task", "train", "--config", tmp_path / "c.yaml", "--lora_r", "abc", "--learning_rate", "nan",
                   "--max_new_tokens", "1e30", "--max_steps", "1e30", "--adam_beta1", "inf", "--max_length", "inf",
                   "--per_device_train_batch_size", "100000000000000000000000")
    err = _no_traceback(proc)
    assert proc.returncode == 2 and err.startswith("error: invalid configuration:"), err
    for key in ("seed", "num_train_epochs", "lora_r", "learning_rate", "max_new_tokens", "max_steps", "adam_beta1",
                "max_length", "per_device_train_batch_size"):
        assert f"`{key}`" in err, (key, err)
    assert len(err.strip().splitlines()) == 10   # the header and one line per key


def _seed_config() -> str:
    text = SEED_README.read_text(encoding="utf-8")
    return re.search(r"```yaml\n(.*?)```", text, re.S).group(1)


@pytest.mark.skipif(not SEED_README.is_file(), reason="the seed's README is not beside the checkout")
def test_seed_config_pasted_as_it_stands_trains(models, tmp_path):
    """The seed's config.yaml block, pasted whole; the command line names the model, the CPU settings of the seed's
    own hardware table (float32, cpu) and the output folder. A secret given to train never lands in its files."""
    config = tmp_path / "config.yaml"
    config.write_text(_seed_config(), encoding="utf-8")
    assert yaml.safe_load(config.read_text(encoding="utf-8"))["learning_rate"] == "5e-4"   # what PyYAML reads
    proc = run_cli("--task", "train", "--config", config, "--model_name_or_path", models("qwen3"), "--device", "cpu",
                   "--dtype", "float32", "--output_dir", tmp_path / "out", "--data_dir", small_llm_data(tmp_path / "d"),
                   "--num_train_epochs", "1", "--api_key", "s3cr3t-key", "--log_level", "debug", timeout=600)
    err = _no_traceback(proc)
    assert proc.returncode == 0, err[-2000:]
    run = tmp_path / "out" / "tiny-qwen3"
    saved = yaml.safe_load((run / "lora_model" / "run_config.yaml").read_text(encoding="utf-8"))
    assert saved["learning_rate"] == 5e-4 and saved["lora_dropout"] == 0.1 and saved["api_key"] is None
    assert "s3cr3t-key" not in err
    for f in run.rglob("*"):
        if f.is_file() and f.stat().st_size < 2**20:
            assert b"s3cr3t-key" not in f.read_bytes(), f


# ----------------------------------------------------------------------------------------------------
# 4. export precision
def test_export_merges_at_least_as_precisely_as_asked(models, tmp_path):
    """A float32 export of a run whose dtype is bfloat16 is merged in float32: the merged weights equal base +
    scale * B @ A computed in float32, not a bfloat16 sum cast up."""
    from safetensors.torch import load_file

    data = small_llm_data(tmp_path / "d")
    args = ["--model_name_or_path", models("qwen3"), "--data_dir", data, "--output_dir", tmp_path / "out",
            "--num_train_epochs", "1", "--save_strategy", "no", "--eval_strategy", "no", "--learning_rate", "1e-2",
            "--device", "cpu"]
    assert run_main("--task", "train", *args) == 0
    assert run_main("--task", "export", *args, "--dtype", "bfloat16", "--export_dtype", "float32",
                    "--api_key", "s3cr3t-key") == 0
    merged = tmp_path / "out" / "tiny-qwen3" / "merged"
    weights = load_file(merged / "model.safetensors")
    adapter = load_file(tmp_path / "out" / "tiny-qwen3" / "lora_model" / "adapter_model.safetensors")
    base = load_file(Path(models("qwen3")) / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.weight"))
    a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k).float()
    b = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k).float()
    expected = base[name].float() + (16 / 8) * b @ a
    assert weights[name].dtype == torch.float32
    assert torch.allclose(weights[name], expected, atol=1e-6)
    assert not torch.equal((base[name].bfloat16() + ((16 / 8) * b @ a).bfloat16()).float(), weights[name])
    assert b"s3cr3t-key" not in (merged / "run_config.yaml").read_bytes()


def test_a_merge_at_another_dtype_is_not_reused(models, tmp_path, caplog):
    import logging

    from config import build_config
    from export import gguf_merge_dtype, reusable_merge
    from outputs import MANIFEST

    assert [gguf_merge_dtype(t) for t in ("f32", "f16", "bf16", "q8_0", "q4_k_m")] == \
        ["float32", "float16", "bfloat16", "float16", "float16"]
    cfg = build_config({"model_name_or_path": str(models("qwen3")), "output_dir": str(tmp_path / "out"),
                        "export_format": "gguf", "gguf_type": "f32", "export_dtype": "float32"}, "test")
    cfg.lora_dir.mkdir(parents=True)
    (cfg.lora_dir / "adapter_model.safetensors").write_bytes(b"x")
    merged = cfg.run_dir / "merged"
    merged.mkdir()
    write_json(merged / "config.json", {"dtype": "bfloat16"})
    (merged / MANIFEST).write_text("{}")
    with caplog.at_level(logging.INFO):
        assert not reusable_merge(cfg, merged)
    assert "holds bfloat16 weights; a f32 GGUF is converted from a float32 merge: merging again" in caplog.text
    write_json(merged / "config.json", {"dtype": "float32"})
    os.utime(merged / MANIFEST)
    assert reusable_merge(cfg, merged)
    old = time.time() - 100
    os.utime(merged / MANIFEST, (old, old))   # written before the adapter: stale
    assert not reusable_merge(cfg, merged)


# ----------------------------------------------------------------------------------------------------
# 5. the run lock
_HOLD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from outputs import run_lock
from config import UserError
try:
    with run_lock(Path(sys.argv[2]), "train"):
        start = time.time(); time.sleep(float(sys.argv[3])); print("ran", start, time.time(), flush=True)
except UserError as e:
    print("refused", flush=True)
"""


def test_run_lock_never_lets_two_processes_hold_it(tmp_path):
    """Eight processes start together on a stale lock (a dead holder's): one runs, the others are refused; no two
    ever overlap. A holder killed with SIGKILL frees the lock at once."""
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_json(run / ".lock", {"pid": dead.pid, "host": os.uname().nodename, "task": "train", "started": "then"})
    procs = [subprocess.Popen([sys.executable, "-c", _HOLD, str(ROOT), str(run), "1.5"], stdout=subprocess.PIPE,
                              text=True) for _ in range(8)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    ran = [(float(o[1]), float(o[2])) for o in outs if o[0] == "ran"]
    assert len(ran) >= 1 and len(ran) + sum(o[0] == "refused" for o in outs) == 8
    ran.sort()
    assert all(a[1] <= b[0] for a, b in zip(ran, ran[1:])), ran   # never two at once
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(ROOT), str(run), "60"], stdout=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if b'"pid": %d' % holder.pid in (run / ".lock").read_bytes():
                    break
            except FileNotFoundError:   # between two holders
                pass
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-c", _HOLD, str(ROOT), str(run), "0"], capture_output=True,
                                text=True, timeout=60)
        assert second.stdout.startswith("refused")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        third = subprocess.run([sys.executable, "-c", _HOLD, str(ROOT), str(run), "0"], capture_output=True,
                               text=True, timeout=60)
        assert third.stdout.startswith("ran")
    finally:
        holder.kill()


# ----------------------------------------------------------------------------------------------------
# 6. defaults that hurt on a real machine
def test_vision_cache_budget_is_shared_by_a_machines_processes(models, monkeypatch):
    from config import build_config
    from model_config import load_base
    from vision_tower import cache_vision_features

    cfg = build_config({"model_type": "vlm", "model_name_or_path": str(models("qwen3_vl")), "dtype": "float32"},
                       "test")
    model, _ = load_base(cfg, "train")
    model.requires_grad_(False)   # a frozen tower, as training leaves it
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    cache = cache_vision_features(model, 4096)
    assert cache.budget == 512 * 2**20
    cache.put(1, [torch.ones(4, 8)])
    assert not cache.slab.is_pinned()


def test_packing_auto_on_cuda_with_sdpa_pads_long_rows(caplog):
    import logging
    import types

    from config import build_config
    from train import DENSE_MASK_TOKENS, _use_packing

    fake = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="sdpa"),
                                 parameters=lambda: iter([types.SimpleNamespace(device=torch.device("cuda"))]))
    cfg = build_config({"packing": "auto"}, "test")
    with caplog.at_level(logging.INFO):
        assert _use_packing(cfg, fake, packed_row=DENSE_MASK_TOKENS + 1) is False
        assert _use_packing(cfg, fake, packed_row=None) is False
    assert "dense mask" in caplog.text


# ----------------------------------------------------------------------------------------------------
# 7. a test that could not run: the FlashAttention-2 packing test's helper took dtype twice
def test_vlm_packing_helper_takes_the_gpu_tests_keys(models, tmp_path):
    from test_packing import _vlm

    cfg, model, _, _ = _vlm(models, tmp_path, dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# 3. the generation thread, in process
class _Engine:
    def __init__(self, fail_with):
        self.fail_with = fail_with

    def generate_rows(self, rows, **kw):
        raise self.fail_with


def _job(loop, engine):
    from types import SimpleNamespace

    from batching import Job
    from data_loading import Example
    from generation import Row

    served = SimpleNamespace(name="m", engine=engine, adapter="default")
    return Job(row=Row(example=Example("q", "")), temperature=0.0, top_p=1.0, seed=None, served=served,
               confidences=False, explicit_max_tokens=False, loop=loop, future=loop.create_future())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is made to die
def test_a_failing_batch_answers_its_request_and_the_thread_goes_on():
    from batching import Scheduler, ThreadStopped

    async def scenario():
        loop = asyncio.get_running_loop()
        engine = _Engine(ValueError("template refused"))
        scheduler = Scheduler(4, 8)
        scheduler.start()
        first = _job(loop, engine)
        assert scheduler.submit(first)
        await asyncio.wait_for(first.future, 30)
        assert isinstance(first.error, ValueError) and scheduler.healthy
        # Something no batch should ever raise stops the thread: waiting requests are answered, health says so.
        engine.fail_with = SystemExit("gone")
        scheduler.max_batch = 1
        jobs = [_job(loop, engine) for _ in range(3)]
        with scheduler.cond:  # queued together, so two still wait when the first batch kills the thread
            for j in jobs:
                scheduler.pending.append(j)
            scheduler.cond.notify()
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 30)
        assert not scheduler.healthy and "SystemExit" in scheduler.failure
        assert all(isinstance(j.error, ThreadStopped) for j in jobs[1:])
        assert not scheduler.submit(_job(loop, engine))

    asyncio.run(scenario())


def test_a_request_waiting_past_its_deadline_is_answered_then_not_when_its_turn_comes():
    from batching import Scheduler

    class Blocking:
        def __init__(self):
            self.release, self.seen = threading.Event(), []

        def generate_rows(self, rows, **kw):
            self.seen.extend(rows)
            assert self.release.wait(30)
            for row in rows:
                row.finish_reason = "stop"

    async def scenario():
        loop = asyncio.get_running_loop()
        engine, scheduler = Blocking(), Scheduler(1, 8)
        scheduler.start()
        try:
            running, waiting = _job(loop, engine), _job(loop, engine)
            running.row.deadline = time.monotonic() + 300
            assert scheduler.submit(running)
            while not engine.seen:  # the first request holds the generation thread
                await asyncio.sleep(0.01)
            waiting.row.deadline = time.monotonic() + 0.3
            started = time.monotonic()
            assert scheduler.submit(waiting)
            await asyncio.wait_for(waiting.future, 10)
            assert waiting.row.finish_reason == "timeout" and time.monotonic() - started < 5
            assert not running.future.done() and waiting not in scheduler.pending
        finally:
            engine.release.set()
        await asyncio.wait_for(running.future, 30)
        assert running.row.finish_reason == "stop" and engine.seen == [running.row]  # the expired one never ran
        await asyncio.sleep(0)
        # no timer outlives its job (each would hold its request, images included, for request_timeout)
        assert not [h for h in loop._scheduled if not h.cancelled()]
        scheduler.stop()

    asyncio.run(scenario())


def test_requests_are_encoded_once_and_off_the_generation_thread(models, monkeypatch):
    """A VLM request: its prompt and image are processed once (for generation and confidences together), by the
    request's thread; the generation thread only pads the batch."""
    from PIL import Image

    import generation
    from config import build_config
    from data_loading import Example
    from generation import Engine, Row, vlm_label_map
    from model_config import load_for_inference

    cfg = build_config({"model_type": "vlm", "model_name_or_path": str(models("qwen3_vl")), "dtype": "float32",
                        "use_original_model": True, "label_map_file": str(ROOT / "data/vlm/label_map.json"),
                        "max_new_tokens": 48}, "test")
    model, processor = load_for_inference(cfg)
    engine = Engine(model, processor, cfg, None, vlm_label_map(cfg))
    calls = []
    real = generation.encode_prompts
    monkeypatch.setattr(generation, "encode_prompts",
                        lambda *a, **k: calls.append(threading.current_thread().name) or real(*a, **k))
    rows = [Row(example=Example("", "", image="request"), images=[Image.new("RGB", (64 + 32 * i, 64), "red")],
                max_tokens=48, constraint=engine.label_constraint.compiled) for i in range(2)]
    for row in rows:
        engine.encode_row(row, explicit=False)
    assert len(calls) == 2 and all(r.images is None for r in rows)
    worker = threading.Thread(target=lambda: [engine.generate_rows(rows)] + [engine.confidences(r) for r in rows],
                              name="generation")
    worker.start()
    worker.join(300)
    assert calls == [threading.main_thread().name] * 2   # nothing encoded on the generation thread
    assert all(r.text.startswith("{") and r.finish_reason in ("stop", "length") for r in rows)
    alone = Row(example=Example("", "", image="request"), images=[Image.new("RGB", (96, 64), "red")],
                max_tokens=48, constraint=engine.label_constraint.compiled)
    engine.generate_rows([alone])
    assert alone.text == rows[1].text   # padding a pre-encoded batch answers as the row alone


def test_text_around_the_json_is_kept_when_confidences_replace_its_value():
    import types

    from config import build_config
    from serve import _content

    row = types.SimpleNamespace(text='Here: {"status": "ok", "confidence": 0.9} done')
    job = types.SimpleNamespace(row=row, notes={"parsed": {"status": "ok", "confidence": 0.42}})
    assert _content(job, build_config({}, "test")) == 'Here: {"status": "ok", "confidence": 0.42} done'


# ----------------------------------------------------------------------------------------------------
# 3 and 8. servers under hostile clients
def _template_that_raises(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    jinja = dst / "chat_template.jinja"
    jinja.write_text("{%- for m in messages %}{%- if 'RAISE' in (m['content'] | string) %}"
                     "{{ raise_exception('this template refuses RAISE') }}{%- endif %}{%- endfor %}"
                     + jinja.read_text(encoding="utf-8"), encoding="utf-8")
    return dst


def _rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def _error(r: httpx.Response, status: int | tuple) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body["error"]


@pytest.fixture(scope="module")
def hostile_llm(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_llm")
    model = _template_that_raises(Path(models("qwen3")), tmp / "tiny-raising")
    server = Server(["--config", ROOT / "configs/demo_llm.yaml", "--model_name_or_path", model, "--tiny_model", "null",
                     "--output_dir", tmp / "out", "--use_original_model", "--max_new_tokens", "8",
                     "--per_device_eval_batch_size", "4", "--max_queue", "16", "--api_key", "s3cret",
                     "--max_request_mb", "12"], tmp / "server.log")
    yield server
    server.stop()


def _post(server, body=None, key="s3cret", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
    if body is not None and "content" not in kw:
        kw["content"] = json.dumps(body)
        headers.setdefault("content-type", "application/json")
    return httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=120, **kw)


def _still_answers(server) -> None:
    assert server.health()["status"] == "ok"
    r = _post(server, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_template_errors_answer_400_and_the_next_request_is_served(hostile_llm):
    server = hostile_llm
    client = server.client(api_key="s3cret")
    import openai

    for _ in range(3):
        with pytest.raises(openai.BadRequestError, match="refuses RAISE"):
            client.chat.completions.create(model="tiny-raising-base",
                                           messages=[{"role": "user", "content": "please RAISE"}])
        reply = client.chat.completions.create(model="tiny-raising-base", max_tokens=3,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content is not None
    assert server.health()["status"] == "ok"


BAD_BODIES = [
    ({"messages": "hi"}, 400), ({"messages": []}, 400), ({"messages": [{"role": "user", "content": 5}]}, 400),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400), ({"max_tokens": "5"}, 400), ({"max_tokens": 0}, 400),
    ({"max_tokens": -1}, 400), ({"max_tokens": 10**30}, 400), ({"temperature": "hot"}, 400),
    ({"temperature": -1}, 400), ({"temperature": 3}, 400), ({"top_p": 0}, 400), ({"top_p": 2}, 400),
    ({"seed": 2**70}, 400), ({"n": 2}, 400), ({"stop": 5}, 400), ({"stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"stop": [""]}, 400), ({"stream": "yes"}, 400), ({"response_format": {"type": "xml"}}, 400),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, 400),
    ({"model": ["a"]}, 400), ({"model": "gpt-4"}, 404), ({"messages": [{"role": "assistant", "content": "x"}]}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     400),
    ({"messages": [{"role": "user", "content": "x"}] + [{"role": "assistant", "content": "y"},
                                                        {"role": "user", "content": "x"}] * 5000}, 400),
    ({"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 100}, 400),
    ({"messages": [{"role": "user", "content": "\ud800 lone surrogate"}]}, (200, 400)),
]


def test_malformed_wrong_and_out_of_range_bodies(hostile_llm):
    server = hostile_llm
    rss = _rss(server)
    for body, status in BAD_BODIES:
        full = {"model": "tiny-raising-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                **body}
        r = _post(server, full)
        if r.status_code != 200:
            _error(r, status)
    for raw in (b"{not json", b"\xff\xfe\x00garbage", b"[" * 100000, b'{"messages": "\xc3\x28"}', b"null", b"5"):
        _error(_post(server, content=raw, headers={"content-type": "application/json"}), 400)
    _error(_post(server, content=b"{}", headers={"content-type": "text/plain"}), 415)    # cross-site forms
    _error(_post(server, content=b"{}", headers={"content-type": "application/x-www-form-urlencoded"}), 415)
    assert _rss(server) < rss + 300 * 2**20
    _still_answers(server)


def test_keys_hosts_and_static_routes(hostile_llm):
    server = hostile_llm
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in ("wrong", "s3cret2", "S3CRET", "s3cre", "s3cret-and-more"):
        _error(_post(server, body, key=key), 401)
    for header in ("Basic s3cret", "s3cret", "Bearer"):
        _error(httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": header}), 401)
    _error(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # DNS rebinding: a page whose name now points at 127.0.0.1 sends its own name as Host
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer s3cret", "Host": "evil.example"})
    assert r.status_code == 400
    for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200
    for path in ("/static/../config.py", "/static/%2e%2e/config.py", "/static/..%2fconfig.py",
                 "/static/%2e%2e%2fserve.py", "/static//etc/passwd", "/static/....//config.py"):
        r = httpx.get(server.url + path)
        assert r.status_code in (400, 404) and "UserError" not in r.text and "root:" not in r.text, path
    assert "s3cret" not in server.log()


def test_grammar_cache_under_concurrent_requests(hostile_llm):
    """Forty distinct schemas from sixteen threads at once (the cache keeps 32): each answer fits its own."""
    server = hostile_llm

    def ask(i):
        schema = {"type": "object", "properties": {f"k{i}": {"enum": [f"v{i}"]}}, "required": [f"k{i}"],
                  "additionalProperties": False}
        r = _post(server, {"model": "tiny-raising-base", "messages": [{"role": "user", "content": "x"}],
                           "max_tokens": 24, "response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "s", "schema": schema}}})
        if r.status_code == 503:
            return None
        assert r.status_code == 200, r.text
        return json.loads(r.json()["choices"][0]["message"]["content"]) == {f"k{i}": f"v{i}"}

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(40)))
    assert all(r is not False for r in results) and results.count(True) >= 20


def test_disconnects_crowds_and_sigterm(hostile_llm):
    server = hostile_llm
    long = {"model": "tiny-raising-base", "messages": [{"role": "user", "content": "tell me"}], "stream": True,
            "max_tokens": 400, "temperature": 1.0, "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
                "type": "string", "minLength": 1500}}}}
    before = server.health()["cancelled"]
    for _ in range(20):   # each reads the first event and hangs up
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=60,
                          headers={"Authorization": "Bearer s3cret"}) as r:
            next(r.iter_lines())
    deadline = time.time() + 120
    while time.time() < deadline and (server.health()["running"] or server.health()["waiting"]):
        time.sleep(0.2)
    assert server.health()["running"] == 0 and server.health()["cancelled"] >= before + 15
    statuses = []

    def client_run(i):
        out = []
        for j in range(5):
            r = _post(server, {"messages": [{"role": "user", "content": f"q{i}-{j}"}], "max_tokens": 3})
            out.append(r.status_code)
            if r.status_code != 200:
                _error(r, 503)
        return out

    with cf.ThreadPoolExecutor(32) as pool:
        for out in pool.map(client_run, range(32)):
            statuses += out
    assert len(statuses) == 160 and set(statuses) <= {200, 503} and statuses.count(200) >= 40
    _still_answers(server)
    # SIGTERM with a request in flight: it is answered, then the server exits 0
    result = {}
    flight = threading.Thread(target=lambda: result.update(r=_post(server, {**long, "stream": False})))
    flight.start()
    deadline = time.time() + 60
    while time.time() < deadline and not server.health()["running"]:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    flight.join(120)
    assert server.proc.wait(120) == 0
    assert result["r"].status_code == 200


def _png(size, mode="RGB", **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG", **save)
    return buf.getvalue()


def _url(raw: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def hostile_vlm(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_vlm")
    folder = tmp / "allowed"
    folder.mkdir()
    server = Server(["--config", ROOT / "configs/demo_vlm.yaml", "--model_name_or_path", models("qwen3_vl"),
                     "--tiny_model", "null", "--output_dir", tmp / "out", "--use_original_model",
                     "--max_new_tokens", "48", "--image_folder", folder, "--max_request_mb", "8"], tmp / "server.log")
    yield server
    server.stop()


VLM_BASE = "tiny-qwen3_vl-base"  # the tiny model's folder name, served as the base model


def _vlm_post(server, content, **extra) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": VLM_BASE, "messages": [{"role": "user", "content": content}], **extra})


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_image_bombs_are_refused_from_their_header(hostile_vlm):
    """A 13000x13000 PNG of a few KB (500 MB decoded) is refused before decoding; twelve of them in one body are
    refused by count before any is opened. The server's memory stays where it was."""
    server = hostile_vlm
    bomb = _png((13000, 13000), mode="1", optimize=True)
    assert len(bomb) < 40_000
    rss = _rss(server)
    err = _error(_vlm_post(server, [_image(_url(bomb))]), 400)
    assert err["code"] == "image_too_large" and "13000x13000" in err["message"]
    err = _error(_vlm_post(server, [_image(_url(bomb))] * 12), 400)
    assert "12 images: at most 8" in err["message"]
    # Eight images each within the bound, together over it
    big = _png((4000, 4000), mode="1")
    err = _error(_vlm_post(server, [_image(_url(big))] * 8), 400)
    assert err["code"] == "image_too_large"
    assert _rss(server) < rss + 150 * 2**20


def test_odd_images_and_fetches(hostile_vlm, tmp_path):
    from PIL import Image

    server = hostile_vlm
    png = _png((64, 64))
    for url in (_url(png[: len(png) // 2]), _url(b"GIF89a" + b"\x00" * 10, "gif"), "http://127.0.0.1:1/x.png",
                "https://169.254.169.254/latest/meta-data", "file:///etc/passwd", "/etc/passwd", "../../etc/passwd",
                "ftp://example.com/a.png", "data:image/png;base64,!!!!", "data:text/html;base64,PGI+"):
        _error(_vlm_post(server, [_image(url)]), 400)
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 128, 0, 0)).save(cmyk, "JPEG")
    sixteen = _png((64, 64), mode="I;16")
    frames = io.BytesIO()
    Image.new("P", (64, 64)).save(frames, "GIF", save_all=True, append_images=[Image.new("P", (64, 64), 3)] * 3)
    for url in (_url(cmyk.getvalue(), "jpeg"), _url(sixteen), _url(frames.getvalue(), "gif")):
        r = _vlm_post(server, [_image(url)])
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("{")   # the label-map answer
    # Image placeholder text in the prompt: the processor refuses it, the request gets 400, the next is served
    r = _vlm_post(server, [_image(_url(png)), {"type": "text", "text": "<|vision_start|><|image_pad|><|vision_end|>"}])
    _error(r, 400)
    assert _vlm_post(server, [_image(_url(png))]).status_code == 200
    assert server.health()["status"] == "ok"


def test_vlm_text_and_custom_schema_requests_are_answered_as_asked(hostile_vlm):
    server = hostile_vlm
    client = server.client()
    png = _png((64, 64))
    content = [_image(_url(png)), {"type": "text", "text": "Describe it."}]
    stream = client.chat.completions.create(model=VLM_BASE, stream=True, max_tokens=24,
                                            response_format={"type": "text"}, temperature=1.0, seed=3,
                                            messages=[{"role": "user", "content": content}])
    chunks = [c for c in stream if c.choices]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(deltas) >= 3                                    # streamed as it was generated, not whole at the end
    assert "field_confidence" not in (chunks[-1].choices[0].model_extra or {})
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"],
              "additionalProperties": False}
    reply = client.chat.completions.create(model=VLM_BASE, messages=[{"role": "user", "content": content}],
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "c", "schema": schema}})
    assert json.loads(reply.choices[0].message.content)["colour"] in ("red", "blue")
    assert "field_confidence" not in (reply.choices[0].model_extra or {})
    label = client.chat.completions.create(model=VLM_BASE, messages=[{"role": "user", "content": content}])
    assert "field_confidence" in label.choices[0].model_extra   # the label-map answer keeps its confidences
