"""The OpenAI-compatible server end to end: a real uvicorn server on a loopback port, a real HTTP client.

Servers run in background threads (one per configuration, module-scoped) and stop by themselves; the SIGTERM
test runs ``dspark serve`` as a subprocess. Every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from click.testing import CliRunner  # noqa: E402

from dspark.cli import main  # noqa: E402
from dspark.runtime.generate import Generator, Request  # noqa: E402
from dspark.serve import create_app  # noqa: E402

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http="h11", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(qwen3_bundle):
    gen = Generator(qwen3_bundle, threads=1)
    srv = ServerThread(create_app(gen, api_key=KEY, chat_template=TEMPLATE, max_queue=32))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def small_server(qwen3_bundle):
    """One row, no queue, and a step slowed to 50 ms so a request stays in flight long enough to watch."""
    gen = Generator(qwen3_bundle, threads=1, max_batch=1)
    step = gen.step

    def slow_step():
        time.sleep(0.05)
        return step()

    gen.step = slow_step
    srv = ServerThread(create_app(gen, max_queue=0))
    yield srv
    srv.stop()


def cli_generate(bundle, prompt, max_new_tokens, *extra):
    result = CliRunner().invoke(main, ["generate", str(bundle), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens),
                                       "--json", "--threads", "1", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def sse_events(lines):
    """Parse 'data: ...' lines strictly; returns (json chunks, saw [DONE] last)."""
    chunks, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        assert not done, "data after [DONE]"
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
        else:
            chunks.append(json.loads(payload))
    return chunks, done


def stream_post(client, path, body):
    with client.stream("POST", path, json=dict(body, stream=True)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(list(r.iter_lines()))


# ------------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("prompt,max_tokens,ignore_eos", [("w5 w6 w7", 12, True), ("w9 w10", 40, False)])
def test_greedy_completion_equals_cli_generate(client, qwen3_bundle, prompt, max_tokens, ignore_eos):
    ref = cli_generate(qwen3_bundle, prompt, max_tokens, *(["--ignore-eos"] if ignore_eos else []))
    r = client.post("/v1/completions", json={"model": "qwen3", "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, "ignore_eos": ignore_eos})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "qwen3" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == ref["text"]
    assert choice["finish_reason"] == ref["finish_reason"]
    assert body["usage"] == {"prompt_tokens": 3 if prompt == "w5 w6 w7" else 2, "completion_tokens": len(ref["token_ids"]),
                             "total_tokens": (3 if prompt == "w5 w6 w7" else 2) + len(ref["token_ids"])}

    # the same request streamed: chunks concatenate to the same text, one finish chunk, usage, then [DONE]
    chunks, done = stream_post(client, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                           "ignore_eos": ignore_eos,
                                                           "stream_options": {"include_usage": True}})
    assert done
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == ref["text"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [ref["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(ref["token_ids"])
    assert len({c["id"] for c in chunks}) == 1


def test_dspark_bundle_greedy_and_no_chat_template(dspark_bundle):
    ref = cli_generate(dspark_bundle, "w4 w8", 16, "--ignore-eos")
    srv = ServerThread(create_app(Generator(dspark_bundle, threads=1)))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/completions", json={"prompt": "w4 w8", "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref["text"]
            assert r.json()["model"] == "bundle"
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "w1"}]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
            metrics = c.get("/metrics").text
            assert 'vllm:spec_decode_num_drafts_total{model_name="bundle"}' in metrics
    finally:
        srv.stop()


def test_chat_completion_uses_the_template(client, qwen3_bundle):
    # TEMPLATE renders "w5 w6 w3": the chat answer is the completion of that text
    ref = cli_generate(qwen3_bundle, "w5 w6 w3", 10, "--ignore-eos")
    body = {"messages": [{"role": "system", "content": "w5"}, {"role": "user", "content": [{"type": "text", "text": "w6"}]}],
            "max_completion_tokens": 10, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ref["text"]}
    assert out["usage"]["prompt_tokens"] == 3 and out["usage"]["completion_tokens"] == 10
    chunks, done = stream_post(client, "/v1/chat/completions", body)
    assert done and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ref["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_sampling_seed_stop_and_token_prompt(client):
    body = {"prompt": "w2 w3", "max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7, "ignore_eos": True}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b and len(a.split()) == 20
    greedy = client.post("/v1/completions", json={"prompt": [2, 3], "max_tokens": 12, "temperature": 0,
                                                  "ignore_eos": True}).json()["choices"][0]
    words = greedy["text"].split()
    stop = words[5]
    cut = client.post("/v1/completions", json={"prompt": "w2 w3", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                                               "stop": [stop, "zzz"]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == greedy["text"][: greedy["text"].find(stop)]


def test_sixteen_concurrent_requests(client, qwen3_bundle):
    prompts = [f"w{i + 1} w{i + 20}" for i in range(16)]
    lengths = [6 + (i % 5) * 3 for i in range(16)]
    plain = Generator(qwen3_bundle, threads=1, use_draft=False)
    refs = plain.generate([Request(plain.tokenizer.encode(p), n, ignore_eos=True) for p, n in zip(prompts, lengths)])

    def one(i):
        body = {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "ignore_eos": True}
        if i % 2:
            chunks, done = stream_post(client, "/v1/completions", body)
            assert done
            return "".join(c["choices"][0]["text"] for c in chunks)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts == [s.text for s in refs]


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("path,body,headers,status,param", [
    ("/v1/completions", b'{"prompt": "w1", ', AUTH, 400, None),                      # malformed JSON
    ("/v1/completions", b'["w1"]', AUTH, 400, None),                                 # not an object
    ("/v1/completions", {"prompt": "w1", "frobnicate": 1}, AUTH, 400, "frobnicate"),  # unknown field
    ("/v1/completions", {"prompt": "w1", "max_tokens": "5"}, AUTH, 400, "max_tokens"),  # wrong type
    ("/v1/completions", {"prompt": "w1", "temperature": "hot"}, AUTH, 400, "temperature"),
    ("/v1/completions", {"max_tokens": 5}, AUTH, 400, "prompt"),                      # missing prompt
    ("/v1/completions", {"prompt": " ".join(["w1"] * 300)}, AUTH, 400, "prompt"),     # prompt too long
    ("/v1/completions", {"prompt": "w1", "max_tokens": 0}, AUTH, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w1", "max_tokens": 100000}, AUTH, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w1", "temperature": 3.5}, AUTH, 400, "temperature"),
    ("/v1/completions", {"prompt": "w1", "top_p": 0}, AUTH, 400, "top_p"),
    ("/v1/completions", {"prompt": "w1", "n": 2}, AUTH, 400, "n"),
    ("/v1/completions", {"prompt": "w1", "logprobs": 3}, AUTH, 400, "logprobs"),
    ("/v1/completions", {"prompt": "w1", "echo": True}, AUTH, 400, "echo"),
    ("/v1/completions", {"prompt": [5, 100000]}, AUTH, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, AUTH, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "w1"}]}, AUTH, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": "w1"}, AUTH, 400, "messages"),
    ("/v1/completions", {"prompt": "w1", "model": "gpt-9"}, AUTH, 404, "model"),
    ("/v1/completions", {"prompt": "w1"}, {"Authorization": "Bearer wrong"}, 401, None),
    ("/v1/completions", {"prompt": "w1"}, {}, 401, None),
    ("/v1/models", None, {"Authorization": "Bearer wrong"}, 401, None),
    ("/v1/nothing", {}, AUTH, 404, None),
])
def test_bad_requests_get_openai_errors(server, path, body, headers, status, param):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        if body is None:
            r = c.get(path, headers=headers)
        elif isinstance(body, bytes):
            r = c.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
        else:
            r = c.post(path, json=body, headers=headers)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param
        if status == 401:
            assert error["code"] == "invalid_api_key"
        # the server keeps serving
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2}, headers=AUTH)
        assert ok.status_code == 200, ok.text


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["qwen3"]
    assert models["data"][0]["max_model_len"] == 256
    assert client.get("/health").json() == {"status": "ok"}


# ------------------------------------------------------------------------------------------- capacity
def test_full_server_answers_429_and_dropped_stream_frees_its_slot(small_server):
    long = {"prompt": "w1 w2", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=small_server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=long) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line)
            assert first.startswith("data: ")
            busy = c.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2})
            assert busy.status_code == 429, busy.text
            assert busy.json()["error"]["code"] == "server_busy" and busy.headers["retry-after"] == "1"
        # the stream was closed after one chunk (~1 round of 200 tokens): the row must come back quickly
        deadline, status = time.monotonic() + 10, None
        while time.monotonic() < deadline:
            status = c.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2}).status_code
            if status != 429:
                break
            time.sleep(0.05)
        assert status == 200
        families = parse_metrics(c.get("/metrics").text)
        success = {s.labels["finished_reason"]: s.value for s in families["vllm:request_success"].samples
                   if s.name.endswith("_total")}
        assert success["cancelled"] >= 1
        http = families["dspark:http_requests"].samples
        assert any(s.labels["status"] == "429" and s.value >= 1 for s in http if s.name.endswith("_total"))
        assert families["vllm:num_requests_running"].samples[0].value == 0


# ------------------------------------------------------------------------------------------- metrics
def parse_metrics(text):
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_as_prometheus_text(client):
    client.post("/v1/completions", json={"prompt": "w7 w8", "max_tokens": 16, "temperature": 0, "ignore_eos": True})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = parse_metrics(r.text)
    for name, kind in [("vllm:spec_decode_num_drafts", "counter"), ("vllm:spec_decode_num_draft_tokens", "counter"),
                       ("vllm:spec_decode_num_accepted_tokens", "counter"),
                       ("vllm:spec_decode_num_accepted_tokens_per_pos", "counter"), ("vllm:request_success", "counter"),
                       ("vllm:prompt_tokens", "counter"), ("vllm:generation_tokens", "counter"),
                       ("vllm:e2e_request_latency_seconds", "histogram"), ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                       ("dspark:http_requests", "counter"), ("dspark:http_request_duration_seconds", "histogram")]:
        assert families[name].type == kind, name
    value = {f: sum(s.value for s in families[f].samples if s.name == f + "_total") for f in families}
    assert value["vllm:spec_decode_num_drafts"] > 0
    assert 0 < value["vllm:spec_decode_num_accepted_tokens"] <= value["vllm:spec_decode_num_draft_tokens"]
    per_pos = {s.labels["position"]: s.value for s in families["vllm:spec_decode_num_accepted_tokens_per_pos"].samples
               if s.name.endswith("_total")}
    assert set(per_pos) == {str(k) for k in range(6)}
    assert sum(per_pos.values()) == value["vllm:spec_decode_num_accepted_tokens"]
    assert value["vllm:generation_tokens"] >= 16
    e2e = {s.name: s.value for s in families["vllm:e2e_request_latency_seconds"].samples}
    assert e2e["vllm:e2e_request_latency_seconds_count"] >= 1


# ------------------------------------------------------------------------------------------- openai client
def test_openai_client_works_unchanged(server, qwen3_bundle):
    openai = pytest.importorskip("openai")
    ref = cli_generate(qwen3_bundle, "w11 w12", 10, "--ignore-eos")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in c.models.list().data] == ["qwen3"]
    out = c.completions.create(model="qwen3", prompt="w11 w12", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref["text"] and out.usage.completion_tokens == 10
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="qwen3", prompt="w11 w12", max_tokens=10,
                                                                     temperature=0, stream=True,
                                                                     extra_body={"ignore_eos": True}))
    assert text == ref["text"]
    chat = c.chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "w1"}], max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="qwen3", messages=[{"role": "user", "content": "w1"}], max_tokens=5, temperature=0, stream=True)
        if ch.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="qwen3", prompt="w1", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="w1")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------- CLI + SIGTERM
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_finishes_in_flight_stream_on_sigterm(qwen3_bundle):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dspark.cli", "serve", str(qwen3_bundle), "--port", str(port),
                             "--threads", "1", "--max-batch", "2", "--log-level", "warning", "--shutdown-timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "w1 w2", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGTERM)
            chunks, done = sse_events([first, *lines])
        assert done, "the in-flight stream was cut off"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(c["choices"][0]["text"] for c in chunks).split()) == 120
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_shutdown_past_the_grace_period_cancels_in_flight_requests(qwen3_bundle):
    gen = Generator(qwen3_bundle, threads=1, max_batch=2)
    step = gen.step

    def slow_step():
        time.sleep(0.05)
        return step()

    gen.step = slow_step
    app = create_app(gen)
    srv = ServerThread(app)
    srv.server.config.timeout_graceful_shutdown = 0.5
    body = {"prompt": "w1 w2", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    lines = []
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        try:
            with c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) == 1:
                        srv.server.should_exit = True
        except httpx.HTTPError:
            pass  # the server closed the connection mid-stream: also a clean cancel
    srv.thread.join(15)
    assert not srv.thread.is_alive()
    assert "data: [DONE]" not in lines or any('"unavailable"' in line for line in lines)
    engine = app.state.engine
    assert not engine._thread.is_alive() and engine.in_flight() == 0 and not gen.has_work()
    cancelled = app.state.metrics.success.labels(model_name="qwen3", finished_reason="cancelled")._value.get()
    assert cancelled == 1
