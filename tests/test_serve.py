"""`mirror-deploy serve`: a real server on a tiny artifact (loopback, a free port), driven by the official
`openai` client and by raw HTTP for the inputs a client library would refuse to send."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mirror_deploy
from mirror_deploy.cli import app
from mirror_deploy.decoding.config import GenerationConfig
from mirror_deploy.decoding.engine import Engine

openai = pytest.importorskip("openai")

ROOT = Path(mirror_deploy.__file__).resolve().parents[1]
PROMPTS = ["Hello world", "abc", "The quick brown fox", "x", "0123456789 tokens", "def f(n):", "Once", "Q: 2+2?"]
LONG = 150          # tokens: long enough (~1 s on the tiny pair) for queueing and disconnects to happen mid-run


class ServerProcess:
    """`mirror-deploy serve` in a subprocess on port 0; its log is collected on a thread."""

    def __init__(self, artifact: Path, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "mirror_deploy.cli", "serve", str(artifact),
                                      "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True)
        self.lines: list[str] = []
        self.port_seen = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self.port_seen.wait(90):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self.port_seen.set()

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", **{"max_retries": 0, "timeout": 60, **kw})

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def http(url: str, body: bytes | dict | None = None, timeout: float = 30) -> tuple[int, dict, dict | str]:
    """Raw HTTP: (status, headers, JSON body or text)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, dict(e.headers), e.read().decode()
    try:
        return status, headers, json.loads(raw)
    except json.JSONDecodeError:
        return status, headers, raw


def metric(server: ServerProcess, name: str) -> float:
    _, _, text = http(server.url + "/metrics")
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values)


def wait_idle(server: ServerProcess, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _, _, health = http(server.url + "/health")
        if not health["busy"] and health["queue_depth"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy after {seconds} s: {health}")


@pytest.fixture(scope="module")
def artifact(tiny_artifacts) -> Path:
    return tiny_artifacts["llama"]


@pytest.fixture(scope="module")
def server(artifact):
    proc = ServerProcess(artifact, "--max-queue", "7")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def engine(artifact) -> Engine:
    return Engine(artifact)


def reference(engine: Engine, prompt: str, chat: bool, **cfg) -> tuple[str, int]:
    result = engine.generate(prompt, GenerationConfig(mode="mirror", **cfg), chat=chat)
    return result.text, len(result.tokens)


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["llama"]
    status, _, health = http(server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["max_context"] == 256


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_chat_plain_and_streamed_equal_run(server, artifact, temperature):
    prompt, seed, n = "The quick brown fox", 5, 40
    ran = CliRunner().invoke(app, ["run", str(artifact), "--prompt", prompt, "--chat", "--json", "--max-new-tokens",
                                   str(n), "--temperature", str(temperature), "--seed", str(seed)])
    assert ran.exit_code == 0, ran.output
    expected = json.loads(ran.stdout.strip().splitlines()[-1])
    client = server.client()
    kwargs = dict(model="llama", messages=[{"role": "user", "content": prompt}], max_tokens=n,
                  temperature=temperature, seed=seed)
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].message.content == expected["text"]
    assert plain.usage.completion_tokens == len(expected["tokens"])
    assert plain.choices[0].finish_reason == ("length" if len(expected["tokens"]) == n else "stop")
    figures = plain.model_extra["mirror"]
    assert figures["mode"] == "mirror" and figures["tokens_per_s"] > 0 and figures["seed"] == seed
    assert 1 <= figures["mean_accepted_tokens"] <= 5 and 0 <= figures["reuse_rate"] <= 1

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["mirror"]["mode"] == "mirror"
    assert chunks[-1].usage.completion_tokens == len(expected["tokens"])
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions_plain_streamed_and_token_ids(server, engine):
    text, count = reference(engine, "def f(n):", chat=False, max_new_tokens=30, temperature=0)
    client = server.client()
    plain = client.completions.create(model="llama", prompt="def f(n):", max_tokens=30, temperature=0)
    assert plain.choices[0].text == text and plain.usage.completion_tokens == count
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="llama", prompt="def f(n):", max_tokens=30, temperature=0, stream=True) if c.choices)
    assert streamed == text
    ids = engine.encode("def f(n):")
    by_ids = client.completions.create(model="llama", prompt=ids, max_tokens=30, temperature=0)
    assert by_ids.choices[0].text == text and by_ids.usage.prompt_tokens == len(ids)


def test_stop_string_cuts_text_and_generation(server, engine):
    full, count = reference(engine, "Hello world", chat=False, max_new_tokens=60, temperature=0)
    assert len(full) >= 12, "the reference run is too short to place a stop string in"
    stop = full[8:11]
    expected = full[:full.find(stop)]
    client = server.client()
    kwargs = dict(model="llama", prompt="Hello world", max_tokens=60, temperature=0, stop=[stop, "\x00never"])
    plain = client.completions.create(**kwargs)
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < count      # generation stopped, not only the text
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [  # path, body, status, words the message must contain
    (CHAT, b"{not json", 400, "not valid JSON"),
    (CHAT, b"[1, 2]", 400, "JSON object"),
    (CHAT, {"model": "llama"}, 400, "messages: Field required"),
    (CHAT, {"messages": MSG}, 400, "model: Field required"),
    (CHAT, {"model": "llama", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "llama", "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"model": "llama", "messages": MSG, "max_tokens": "many"}, 400, "max_tokens"),
    (CHAT, {"model": "llama", "messages": [{"role": "user"}]}, 400, "content"),
    (CHAT, {"model": "gpt-4o", "messages": MSG}, 404, "model 'gpt-4o' does not exist"),
    (CHAT, {"model": "llama", "messages": MSG, "temperature": -0.5}, 400, "temperature"),
    (CHAT, {"model": "llama", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": "llama", "messages": MSG, "max_tokens": 5000}, 400, "capacity of 256"),
    (CHAT, {"model": "llama", "messages": [{"role": "user", "content": "x" * 400}]}, 400, "capacity of 256"),
    (CHAT, {"model": "llama", "messages": MSG, "n": 3}, 400, "'n'"),
    (CHAT, {"model": "llama", "messages": MSG, "logprobs": True}, 400, "'logprobs' is not supported"),
    ("/v1/completions", {"model": "llama", "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"model": "llama", "prompt": [1, 99999]}, 400, "token ids"),
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[3][:20]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(server, path, body, status, words):
    got, _, reply = http(server.url + path, body)
    assert got == status, reply
    assert set(reply) == {"error"} and words in reply["error"]["message"], reply
    assert {"message", "type", "param", "code"} <= set(reply["error"])


def test_bad_input_through_the_client_raises_its_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="capacity of 256"):
        client.completions.create(model="llama", prompt="x" * 300)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="llama", prompt="x", temperature=-1)


def _chat(server, i: int, max_tokens: int = 40) -> tuple[int, str | None, int]:
    client = server.client()
    try:
        reply = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": PROMPTS[i % 8]}],
                                               max_tokens=max_tokens, temperature=0.7, seed=i)
        return 200, reply.choices[0].message.content, reply.usage.completion_tokens
    except openai.RateLimitError as e:
        assert int(e.response.headers["retry-after"]) >= 1
        assert "busy" in e.message
        return 429, None, 0


def _expected(engine, i: int, max_tokens: int = 40) -> tuple[str, int]:
    return reference(engine, PROMPTS[i % 8], chat=True, max_new_tokens=max_tokens, temperature=0.7, seed=i)


def test_eight_concurrent_clients_all_complete_correctly(server, engine):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _chat(server, i), range(8)))
    for i, (status, text, count) in enumerate(results):
        assert status == 200
        assert (text, count) == _expected(engine, i)


def test_queue_overflow_gets_429_with_retry_after(server, engine):
    wait_idle(server)
    rejected_before = metric(server, 'mirror_deploy_requests_total{endpoint="/v1/chat/completions",status="429"}')
    barrier = threading.Barrier(16)

    def client(i):
        barrier.wait(10)
        return _chat(server, i, LONG)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    statuses = [s for s, _, _ in results]
    assert statuses.count(429) >= 1, "16 requests at once on a queue of 7 should overflow"
    assert statuses.count(200) >= 8          # the running one and the 7 that fit in the queue
    for i, (status, text, count) in enumerate(results):
        if status == 200:
            assert (text, count) == _expected(engine, i, LONG)
    assert metric(server, 'mirror_deploy_requests_total{endpoint="/v1/chat/completions",status="429"}') \
        == rejected_before + statuses.count(429)


def test_disconnected_stream_frees_the_engine(server, engine):
    wait_idle(server)
    cancelled = metric(server, 'mirror_deploy_generations_total{finish_reason="cancelled"}')
    tokens = metric(server, "mirror_deploy_completion_tokens_total")
    stream = server.client().completions.create(model="llama", prompt="Once", max_tokens=LONG, temperature=0,
                                                stream=True)
    received = [next(stream), next(stream)]
    assert all(c.choices[0].finish_reason is None for c in received)
    stream.close()
    wait_idle(server, 5)
    assert metric(server, 'mirror_deploy_generations_total{finish_reason="cancelled"}') == cancelled + 1
    assert metric(server, "mirror_deploy_completion_tokens_total") - tokens < LONG   # it stopped early
    text, count = _expected(engine, 3)
    assert _chat(server, 3) == (200, text, count)          # the next request runs, and correctly


def test_client_timeout_on_a_plain_request_frees_the_engine(server):
    wait_idle(server)
    cancelled = metric(server, 'mirror_deploy_generations_total{finish_reason="cancelled"}')
    with pytest.raises(openai.APITimeoutError):
        server.client(timeout=0.1).completions.create(model="llama", prompt="Once", max_tokens=LONG, temperature=0)
    wait_idle(server, 5)
    assert metric(server, 'mirror_deploy_generations_total{finish_reason="cancelled"}') == cancelled + 1


def test_metrics_count_requests_tokens_and_queue(server):
    _, headers, text = http(server.url + "/metrics")
    assert headers["content-type"].startswith("text/plain")
    for name in ("mirror_deploy_requests_total", "mirror_deploy_completion_tokens_total",
                 "mirror_deploy_last_tokens_per_second", "mirror_deploy_last_reuse_rate", "mirror_deploy_queue_depth"):
        assert name in text
    assert metric(server, 'mirror_deploy_requests_total{endpoint="/v1/chat/completions",status="200"}') >= 8
    assert metric(server, "mirror_deploy_completion_tokens_total") > 0


def test_still_healthy_after_everything(server, engine):
    assert server.proc.poll() is None
    assert wait_idle(server)["status"] == "ok"
    text, count = _expected(engine, 0)
    assert _chat(server, 0) == (200, text, count)
    assert "Traceback" not in server.log()


def test_ctrl_c_drains_the_stream_in_flight(artifact, engine):
    proc = ServerProcess(artifact, "--mode", "sd")
    try:
        expected = engine.generate("Once", GenerationConfig(max_new_tokens=LONG, mode="sd", temperature=0)).text
        stream = proc.client().completions.create(model="llama", prompt="Once", max_tokens=LONG, temperature=0,
                                                  stream=True)
        first = next(stream)
        proc.proc.send_signal(signal.SIGINT)
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
        assert text == expected
        assert proc.proc.wait(30) in (0, 130)
        assert "after finishing the requests in flight" in proc.log()
        with pytest.raises(openai.APIConnectionError):
            proc.client().models.list()
    finally:
        proc.stop()


def test_serve_refuses_bad_options(artifact):
    result = CliRunner().invoke(app, ["serve", str(artifact), "--mode", "fast"])
    assert result.exit_code == 2 and "mode 'fast' is unknown" in result.output
    result = CliRunner().invoke(app, ["serve", str(artifact), "--max-queue", "0"])
    assert result.exit_code == 2 and "--max-queue must be at least 1" in result.output


# ---- the engine side of cancelling: on_tokens returning True ends the run after that step ----------------

@pytest.mark.parametrize("mode", ["ar", "sd", "mirror"])
def test_on_tokens_returning_true_ends_the_run_cleanly(engine, mode):
    cfg = GenerationConfig(max_new_tokens=40, mode=mode, temperature=0, stop_at_eos=False)
    full = engine.generate("Hello world", cfg).tokens
    calls = []

    def stop_after_three(new):
        calls.append(list(new))
        return len(calls) == 3

    cut = engine.generate("Hello world", cfg, on_tokens=stop_after_three)
    assert len(calls) == 3 and cut.tokens == [t for step in calls for t in step]
    assert cut.tokens == full[:len(cut.tokens)] and len(cut.tokens) < len(full)
    assert cut.summary["steps"] == 3 and cut.summary["new_tokens"] == len(cut.tokens)
    assert not [t for t in threading.enumerate() if t.name.startswith("draft-device")]   # worker closed
    assert engine.generate("Hello world", cfg).tokens == full      # and the engine is ready again


# ---- the serve benchmark, and an engine failure -----------------------------------------------------------

def test_serve_benchmark_runs_and_reports(artifact, tmp_path):
    from mirror_deploy.bench import serve as bench_serve
    out = tmp_path / "serve.json"
    bench_serve.main([str(artifact), "--requests", "6", "--pairs", "2", "--max-tokens", "8", "--json", str(out)])
    fig = json.loads(out.read_text())
    assert fig["text_mismatches"] == 0 and fig["requests"] == 6
    assert fig["ttft_ms"]["direct"] > 0 and fig["ttft_ms"]["server"] > 0
    assert fig["tokens_per_s"]["server"] > 0 and fig["rss_mib"]["after_all"] > 0


def test_a_failing_generation_is_a_500_and_the_server_lives_on(engine, monkeypatch):
    from mirror_deploy.bench.serve import InProcessServer
    real = engine.generate
    failures = iter([RuntimeError("device lost"), RuntimeError("device lost")])

    def flaky(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", flaky)
    server = InProcessServer(engine, "mirror")
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)
        kwargs = dict(model=server.name, prompt="Once", max_tokens=8, temperature=0)
        with pytest.raises(openai.InternalServerError, match="generation failed: RuntimeError: device lost"):
            client.completions.create(**kwargs)
        with pytest.raises(openai.APIError, match="device lost"):
            list(client.completions.create(**kwargs, stream=True))
        assert client.completions.create(**kwargs).choices[0].text == real("Once", GenerationConfig(
            max_new_tokens=8, temperature=0)).text
    finally:
        server.close()


@pytest.mark.parametrize("lookup", [True, False])
def test_serve_lookup_beside_the_draft_keeps_the_output(artifact, engine, lookup):
    """`serve --lookup` (as `run --lookup`): every request's sd windows may come from prompt lookup, and the
    text is still the target's own."""
    from fastapi.testclient import TestClient

    from mirror_deploy.serve.app import create_app

    prompt = "abc abc abc abc abc abc abc abc abc"
    want = engine.generate(prompt, GenerationConfig(mode="ar", max_new_tokens=24), chat=False)
    with TestClient(create_app(engine, "m", 4, "sd", lookup=lookup)) as client:
        reply = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 24,
                                                       "temperature": 0}).json()
    assert reply["choices"][0]["text"] == want.text
    assert reply["mirror"]["mode"] == "sd"
    assert (reply["mirror"]["lookup_windows"] > 0) == lookup


def test_serve_refuses_lookup_with_mode_ar(artifact):
    result = CliRunner().invoke(app, ["serve", str(artifact), "--mode", "ar", "--lookup", "--port", "0"])
    assert result.exit_code == 2 and "lookup beside the draft" in " ".join(result.output.split())
