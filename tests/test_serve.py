"""`--task serve` as its users use it: a subprocess on a free loopback port, driven by the official `openai`
client (and plain httpx for what a client library hides: status codes, headers, disconnects)."""

import concurrent.futures as cf
import json
import threading
import time

import httpx
import openai
import pytest

from conftest import ROOT, run_main, write_json
from serving import Server

DEMO = str(ROOT / "configs" / "demo_llm.yaml")
TRAIN = json.loads((ROOT / "data/llm/train.json").read_text(encoding="utf-8"))
# A request that cannot end early: the grammar allows no end before 1500 characters.
LONG = {"temperature": 1.0, "seed": 1, "response_format": {"type": "json_schema", "json_schema": {
    "name": "long", "schema": {"type": "string", "minLength": 1500}}}}
# One that runs to its max_tokens (up to 2000): the tiny tokenizer's longest token has 10 characters.
ENDLESS = {**LONG, "response_format": {"type": "json_schema", "json_schema": {
    "name": "endless", "schema": {"type": "string", "minLength": 20000}}}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """The trained LLM demo, its inference answers (fine-tuned and base) for the training prompts, and a server."""
    tmp = tmp_path_factory.mktemp("serve")
    args = ["--config", DEMO, "--model_name_or_path", tmp / "tiny-qwen3", "--output_dir", tmp / "out",
            "--data_dir", ROOT / "data" / "llm", "--save_strategy", "no", "--eval_strategy", "no"]
    assert run_main("--task", "train", *args) == 0
    questions = write_json(tmp / "q.json", [{"text": r["text"]} for r in TRAIN[:8]])
    answers = {}
    for label, extra in (("tuned", []), ("base", ["--use_original_model"])):
        out = tmp / f"{label}.jsonl"
        assert run_main("--task", "inference", *args, *extra, "--input", questions, "--output", out,
                        "--max_new_tokens", "64") == 0
        answers[label] = [json.loads(x)["prediction"] for x in out.read_text(encoding="utf-8").splitlines()]
    server = Server([*args, "--max_new_tokens", "64", "--per_device_eval_batch_size", "4", "--max_queue", "8",
                     "--max_request_mb", "1"], tmp / "server.log")
    server.model_path = tmp / "tiny-qwen3"
    yield server, answers, args, tmp
    server.stop()


def _json_matcher(server):
    """xgrammar's matcher of any JSON object, over the served model's tokenizer."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.model_path)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok))
    return xgr.GrammarMatcher(compiler.compile_builtin_json_grammar())


def _ask(client, text, **kw):
    return client.chat.completions.create(model=kw.pop("model", "tiny-qwen3"),
                                          messages=[{"role": "user", "content": text}], **kw)


def test_answers_equal_inference_streamed_or_not(llm):
    server, answers, _, _ = llm
    client = server.client()
    for question, expected in zip(TRAIN[:8], answers["tuned"]):
        reply = _ask(client, question["text"], max_tokens=64)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.usage.completion_tokens > 0
        stream = _ask(client, question["text"], max_tokens=64, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert answers["tuned"][0] == TRAIN[0]["target"]      # the adapter really answers


def test_base_model_answers_from_the_same_load(llm):
    server, answers, _, _ = llm
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3", "tiny-qwen3-base"]
    differs = 0
    for question, base, tuned in zip(TRAIN[:8], answers["base"], answers["tuned"]):
        got = _ask(client, question["text"], model="tiny-qwen3-base", max_tokens=64).choices[0].message.content
        assert got == base
        differs += got != tuned
    assert differs >= 6


def test_chat_template_renders_turns_and_system_as_training(llm):
    server, _, _, _ = llm
    client = server.client()
    q = TRAIN[1]
    # The training sample again as a conversation with an earlier exchange: the template sees every turn.
    history = [{"role": "user", "content": TRAIN[0]["text"]}, {"role": "assistant", "content": TRAIN[0]["target"]},
               {"role": "user", "content": q["text"]}]
    two = client.chat.completions.create(model="tiny-qwen3", messages=history, max_tokens=64)
    one = _ask(client, q["text"], max_tokens=64)
    assert two.usage.prompt_tokens > one.usage.prompt_tokens + 40
    with_system = client.chat.completions.create(
        model="tiny-qwen3", max_tokens=8, messages=[{"role": "system", "content": "Answer briefly."},
                                                    {"role": "user", "content": q["text"]}])
    assert with_system.usage.prompt_tokens > one.usage.prompt_tokens


def test_stop_max_tokens_and_json_formats(llm):
    server, answers, _, _ = llm
    client = server.client()
    full = answers["tuned"][0]
    stop = full[10:12]
    cut = _ask(client, TRAIN[0]["text"], stop=[stop, "never-there"], max_tokens=64)
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _ask(client, TRAIN[0]["text"], stop=stop, max_tokens=64, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]            # nothing of the stop string leaks into the stream
    short = _ask(client, TRAIN[0]["text"], max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    obj = _ask(client, TRAIN[2]["text"], max_tokens=64, response_format={"type": "json_object"})
    text = obj.choices[0].message.content
    # Ended or cut at max_tokens, the text is JSON so far: the grammar accepts it (a random model may not close it).
    matcher = _json_matcher(server)
    assert matcher.accept_string(text), text
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert obj.choices[0].finish_reason == "length" and obj.usage.completion_tokens == 64
        assert not matcher.is_terminated()
    schema = {"type": "object", "properties": {"mood": {"enum": ["晴", "雨"]}}, "required": ["mood"],
              "additionalProperties": False}
    for q in TRAIN[:3]:
        reply = _ask(client, q["text"], max_tokens=32, response_format={
            "type": "json_schema", "json_schema": {"name": "m", "schema": schema}})
        assert json.loads(reply.choices[0].message.content)["mood"] in ("晴", "雨")


@pytest.mark.parametrize("body,status,fragment", [
    ({"foo": 1}, 400, "unsupported field `foo`"),
    ({"n": 2}, 400, "only n=1"),
    ({"temperature": 5}, 400, "`temperature`"),
    ({"model": "gpt-4"}, 404, "does not exist"),
    ({"max_tokens": 5000}, 400, "context is 2048 tokens"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message must be the user's"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                        "AAAA"}}]}]},
     400, "reads text only"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
])
def test_bad_requests_get_openai_errors(llm, body, status, fragment):
    server, _, _, _ = llm
    request = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "你好"}], **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=request, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in server.log()


def test_openai_client_raises_typed_errors(llm):
    server, _, _, _ = llm
    client = server.client(max_retries=0)
    with pytest.raises(openai.BadRequestError, match="unsupported field"):
        _ask(client, "你好", extra_body={"logit_bias": {"1": 5}})
    with pytest.raises(openai.NotFoundError):
        _ask(client, "你好", model="nope")


def test_body_limit_and_broken_json(llm):
    server, _, _, _ = llm
    big = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big, timeout=60)
    assert r.status_code == 413 and "max_request_mb" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_client_leaving_mid_stream_cancels_its_generation(llm):
    server, answers, _, _ = llm
    before = server.health()["cancelled"]
    request = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "写一首长诗"}], "stream": True,
               "max_tokens": 2000, **ENDLESS}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=request, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any('"content"' in line for line in got)
    started = time.monotonic()
    assert _wait_for(lambda: server.health()["cancelled"] == before + 1 and server.health()["running"] == 0)
    assert time.monotonic() - started < 3          # 2000 tokens would take several seconds more
    reply = _ask(server.client(), TRAIN[0]["text"], max_tokens=64)
    assert reply.choices[0].message.content == answers["tuned"][0]


def test_full_queue_answers_503_with_retry_after(llm):
    server, _, _, _ = llm
    request = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "写"}], "max_tokens": 300, **LONG}
    with cf.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: httpx.post(server.url + "/v1/chat/completions", json=request,
                                                     timeout=120), range(20)))
    codes = sorted(r.status_code for r in replies)
    refused = [r for r in replies if r.status_code == 503]
    assert set(codes) == {200, 503} and len(refused) >= 4          # 4 running + 8 waiting fit
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in replies if r.status_code == 200)


def test_sixteen_clients_twenty_requests_each(llm):
    """Every request answered or cleanly refused; concurrent requests share batches; memory stays flat."""
    import psutil

    server, answers, _, _ = llm
    proc = psutil.Process(server.proc.pid)
    health = server.health()
    errors, ok, refused = [], [], []
    lock = threading.Lock()

    def client_loop(k):
        client = server.client(max_retries=3)
        for i in range(20):
            q = (k + i) % 8
            try:
                reply = _ask(client, TRAIN[q]["text"], max_tokens=64, stream=(i % 3 == 0))
                text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if i % 3 == 0 \
                    else reply.choices[0].message.content
                with lock:
                    (ok if text == answers["tuned"][q] else errors).append((q, text))
            except openai.APIStatusError as e:
                with lock:
                    (refused if e.status_code == 503 else errors).append(e)
            except Exception as e:  # noqa: BLE001 - anything else is a failure of the server
                with lock:
                    errors.append(e)

    rss = []
    for _ in range(2):
        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        rss.append(proc.memory_info().rss)
    assert not errors, errors[:3]
    # 4 running + 8 waiting fit at once; the rest are refused with 503 and retried by the client (3 times,
    # after Retry-After): most requests get through, the others end refused, none fails otherwise.
    assert len(ok) + len(refused) == 2 * 16 * 20 and len(ok) >= 0.75 * 2 * 16 * 20
    after = server.health()
    served = after["served"] - health["served"]
    assert after["batches"] - health["batches"] < served / 2       # requests shared generate() calls
    assert rss[1] - rss[0] < 100 * 2**20                           # a second round costs no more memory


def test_sigterm_drains_in_flight_and_exits_zero_and_api_key(llm):
    _, _, args, tmp = llm
    server = Server([*args, "--max_new_tokens", "64", "--request_timeout", "2"], tmp / "keyed.log",
                    env={"LORA_API_KEY": "s3cret"})
    try:
        assert httpx.get(server.url + "/health").status_code == 200          # health needs no key
        for path in ("/v1/models", "/v1/info"):
            r = httpx.get(server.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                       json={"messages": [{"role": "user", "content": "你好"}]})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong", max_retries=0).models.list()
        client = server.client(api_key="s3cret")
        assert len(client.models.list().data) == 2
        # Past request_timeout: 504 in OpenAI's layout, at the deadline, whether the request is running or still
        # waiting. Seeded requests run one at a time, so the last of these four waits behind three others that
        # cannot end before 2000 tokens each (8000 tokens in 2 s would be some 8 times this machine's speed).
        endless = {"messages": [{"role": "user", "content": "写"}], "max_tokens": 2000, **ENDLESS}
        started = time.monotonic()
        with cf.ThreadPoolExecutor(4) as pool:
            ahead = [pool.submit(httpx.post, server.url + "/v1/chat/completions", json=endless, timeout=120,
                                 headers={"Authorization": "Bearer s3cret"}) for _ in range(3)]
            time.sleep(0.3)
            r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                           timeout=120, json=endless)
            assert r.status_code == 504 and "request_timeout=2" in r.json()["error"]["message"]
            assert time.monotonic() - started < 4
            for f in ahead:
                f.result()
        # A long stream in flight when SIGTERM arrives still ends with [DONE]; then the process exits 0.
        request = {"model": "tiny-qwen3", "messages": [{"role": "user", "content": "写"}], "stream": True,
                   "max_tokens": 100, **LONG}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=request, timeout=120,
                          headers={"Authorization": "Bearer s3cret"}) as r:
            lines = r.iter_lines()
            first = next(lines)
            server.proc.send_signal(15)
            rest = [first, *lines]
        assert rest[-1].strip() == "data: [DONE]" or [x for x in rest if x.strip()][-1].strip() == "data: [DONE]"
        chunks = [json.loads(x[5:]) for x in rest if x.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"     # ran to its max_tokens, not cut off
        assert sum(len(c["choices"][0]["delta"].get("content", "")) for c in chunks) > 50
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_web_page_chat(llm):
    import shutil

    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright
    from test_serve_vlm import CHROMIUM_FLAGS

    server, answers, _, _ = llm
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#chat:not([hidden])")
        assert page.locator("#model option").all_inner_texts() == ["tiny-qwen3", "tiny-qwen3-base"]
        page.fill("#prompt", TRAIN[0]["text"])
        page.click("#send")
        page.wait_for_function("document.querySelector('.msg.assistant') && "
                               "document.querySelector('#send').disabled === false", timeout=60_000)
        assert page.inner_text(".msg.assistant") == answers["tuned"][0]
        browser.close()


def test_busy_port_and_bad_image_folder_fail_before_the_model_loads(llm, tmp_path):
    import socket

    from conftest import run_cli

    _, _, args, _ = llm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        started = time.monotonic()
        proc = run_cli("--task", "serve", *args, "--port", s.getsockname()[1], timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1:" in err and "choose another --port" in err
    assert "loaded LoRA adapter" not in err and time.monotonic() - started < 60
    proc = run_cli("--task", "serve", *args, "--image_folder", tmp_path / "nowhere", "--port", "0", timeout=120)
    assert proc.returncode == 2 and "`image_folder`" in proc.stderr.decode()
