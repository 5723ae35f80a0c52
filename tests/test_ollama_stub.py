"""The Ollama stand-in, checked through the real ``ollama`` client and raw HTTP.

If the stub drifted from Ollama's API, every other test built on it would be
testing a fiction, so its wire format is pinned here.
"""

import asyncio
import http.client
import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ollama_stub import OllamaStub, embed_text  # noqa: E402

CHAT = "llama3.1:8b"
EMBED = "bge-m3"


@pytest.fixture
def stub():
    with OllamaStub(name="gpu0") as running:
        yield running


@pytest.fixture
def client(stub):
    return ollama.Client(host=stub.url)


def ask(client, text, **kwargs):
    return client.chat(model=CHAT, messages=[{"role": "user", "content": text}], **kwargs)


def ask_model(client, model):
    return client.chat(model=model, messages=[{"role": "user", "content": "x"}])


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def assert_counters(final):
    for key in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        assert isinstance(final[key], int) and final[key] > 0, key


def test_root_and_version(stub):
    assert httpx.get(stub.url).text == "Ollama is running"
    head = httpx.head(stub.url)
    assert head.status_code == 200 and head.content == b""
    assert httpx.get(f"{stub.url}/api/version").json() == {"version": "0.12.0"}
    assert httpx.get(f"{stub.url}/api/nope").status_code == 404


def test_list_show_and_ps(client, stub):
    models = {m.model: m for m in client.list().models}
    assert set(models) == {CHAT, "bge-m3:latest"}
    assert models[CHAT].details.family == "llama"
    assert models[CHAT].size > 0 and len(models[CHAT].digest) == 64

    chat = client.show(CHAT)
    assert chat.capabilities == ["completion"]
    assert chat.modelinfo["general.architecture"] == "llama"
    embed = client.show(EMBED)
    assert embed.capabilities == ["embedding"]
    assert embed.modelinfo["bert.embedding_length"] == 256
    assert client.ps().models == []

    with pytest.raises(ollama.ResponseError) as err:
        client.show("missing:7b")
    assert err.value.status_code == 404
    assert err.value.error == "model 'missing:7b' not found"


def test_chat_echoes_the_last_user_message(client):
    reply = client.chat(
        model=CHAT,
        messages=[
            {"role": "system", "content": "Answer from the passages."},
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": "Dov'è la città di Pisa?"},
        ],
        stream=False,
        think=False,
        format="json",
        keep_alive="5m",
        options={"temperature": 0},
    )
    words = reply.message.content.split()
    assert words[:5] == ["Echo:", "Dov'è", "la", "città", "di"]
    assert len(words) == 1 + 48 and reply.eval_count == 48
    assert reply.message.role == "assistant"
    assert reply.done and reply.done_reason == "stop"
    assert reply.prompt_eval_count == 4 + 2 + 2 + 5
    assert_counters(reply)


def test_streamed_chat_matches_the_whole_reply(client):
    whole = ask(client, "uno due tre", stream=False)
    parts = list(ask(client, "uno due tre", stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[0].message.content == "Echo: uno" and parts[1].message.content == " due"
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].message.content == "" and parts[-1].done_reason == "stop"
    assert parts[-1].eval_count == len(parts) - 1 == 48
    assert_counters(parts[-1])


def test_token_directive_and_num_predict(client, stub):
    parts = list(ask(client, "pochi token [[tokens=5]]", stream=True))
    assert len(parts) == 5 + 1 and parts[-1].eval_count == 5
    assert "".join(p.message.content for p in parts) == "Echo: pochi token pochi token pochi"

    cut = ask(client, "tanti [[tokens=20]]", options={"num_predict": 3})
    assert cut.eval_count == 3 and cut.done_reason == "length"
    roomy = ask(client, "pochi [[tokens=2]]", options={"num_predict": 10})
    assert roomy.eval_count == 2 and roomy.done_reason == "stop"

    stub.configure(reply_tokens=7)
    assert ask(client, "a b").eval_count == 7


def test_generate_and_load_requests(client):
    reply = client.generate(model=CHAT, prompt="alfa beta", system="sii breve", stream=False)
    assert reply.response == "Echo: alfa beta" + " alfa beta" * 23
    assert reply.prompt_eval_count == 4 and reply.done_reason == "stop"
    assert_counters(reply)

    parts = list(client.generate(model=CHAT, prompt="x [[tokens=3]]", stream=True))
    assert [p.response for p in parts] == ["Echo: x", " x", " x", ""]

    load = client.generate(model=CHAT, prompt="")
    assert load.done and load.done_reason == "load" and load.response == ""
    unload = client.generate(model=CHAT, prompt="", keep_alive=0)
    assert unload.done_reason == "unload"
    assert client.chat(model=CHAT, messages=[]).done_reason == "load"


def test_async_client_streams_too(stub):
    async def talk():
        client = ollama.AsyncClient(host=stub.url)
        messages = [{"role": "user", "content": "async [[tokens=3]]"}]
        parts = [p async for p in await client.chat(model=CHAT, messages=messages, stream=True)]
        vectors = (await client.embed(model=EMBED, input=["a", "b"])).embeddings
        return parts, vectors

    parts, vectors = asyncio.run(talk())
    assert "".join(p.message.content for p in parts) == "Echo: async async async"
    assert parts[-1].done and len(vectors) == 2


def test_embeddings_are_deterministic_bags_of_words(client):
    texts = ["Il gatto dorme sul divano", "il GATTO dorme", "Borsa di Milano in rialzo", ""]
    vectors = client.embed(model=EMBED, input=texts).embeddings
    assert vectors == [embed_text(t, 256) for t in texts]
    assert all(len(v) == 256 and math.isclose(cosine(v, v), 1.0) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > 0.7
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert vectors[3] == embed_text("", 256)

    # accented letters belong to the word: "città" is neither "citt" nor "citta"
    assert embed_text("Città perché", 64) == embed_text("città, PERCHÉ!", 64)
    assert embed_text("città", 64) != embed_text("citta", 64)
    assert embed_text("città", 64) != embed_text("citt", 64)

    single = client.embed(model=EMBED, input="Il gatto dorme sul divano")
    assert single.embeddings == [vectors[0]] and single.model == EMBED
    assert single.prompt_eval_count == 5 and single.total_duration > 0
    assert client.embed(model=EMBED, input="").embeddings == []

    short = client.embed(model=EMBED, input="gatto", dimensions=32).embeddings[0]
    assert len(short) == 32 and math.isclose(cosine(short, short), 1.0)

    legacy = client.embeddings(model=EMBED, prompt="Il gatto dorme sul divano")
    assert list(legacy.embedding) == vectors[0]


def test_embedding_dim_and_models_are_configurable(client, stub):
    stub.configure(embed_dim=1024, embed_models=["nomic-embed-text"], chat_models=["qwen2.5:7b"])
    assert len(client.embed(model="nomic-embed-text:latest", input="x").embeddings[0]) == 1024
    assert ask_model(client, "qwen2.5:7b").eval_count == 48
    with pytest.raises(ollama.ResponseError):
        client.embed(model=EMBED, input="x")


def test_errors_look_like_ollama(client, stub):
    for call in (
        lambda: ask_model(client, "nope:1b"),
        lambda: client.generate(model="nope:1b", prompt="x"),
        lambda: client.embed(model="nope:1b", input="x"),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404
        assert err.value.error == 'model "nope:1b" not found, try pulling it first'

    with pytest.raises(ollama.ResponseError) as err:
        ask_model(client, EMBED)
    assert (err.value.status_code, err.value.error) == (400, '"bge-m3" does not support chat')
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=CHAT, input="x")
    assert err.value.status_code == 400 and "does not support embeddings" in err.value.error

    bad = httpx.post(f"{stub.url}/api/chat", content=b'{"model": ')
    assert bad.status_code == 400 and "error" in bad.json()
    assert httpx.post(f"{stub.url}/api/embed", content=b"").json() == {
        "error": "missing request body"
    }
    wrong = httpx.post(f"{stub.url}/api/embed", json={"model": EMBED, "input": [1, 2]})
    assert wrong.status_code == 400 and wrong.json() == {"error": "invalid input type"}


def test_injected_failures(client, stub):
    stub.configure(fail_status=503, fail_message="server busy", fail_count=2)
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as err:
            ask(client, "x")
        assert (err.value.status_code, err.value.error) == (503, "server busy")
    assert ask(client, "x").done
    assert stub.config["fail_count"] == 0

    stub.configure(fail_status=500, fail_count=-1)
    for call in (
        lambda: list(ask(client, "x", stream=True)),
        lambda: client.generate(model=CHAT, prompt="x"),
        lambda: client.embed(model=EMBED, input="x"),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 500
    assert client.list().models  # metadata endpoints never fail


def test_tokens_arrive_as_they_are_generated(client, stub):
    stub.configure(tps=25)
    start = time.monotonic()
    arrivals = [time.monotonic() - start for _ in ask(client, "x [[tokens=10]]", stream=True)]
    # ~0.04 s for the first token against ~0.4 s for the last: buffered output would bunch them
    assert arrivals[0] < arrivals[-1] / 3
    assert arrivals[4] < arrivals[-1] * 0.75


def test_latency_and_pacing_show_in_counters(client, stub):
    stub.configure(latency=0.1, tps=50)
    reply = ask(client, "x [[tokens=5]]")
    # counters are measured, so allow for clock granularity rather than wall-clock speed
    assert reply.prompt_eval_duration >= 0.09e9
    assert reply.eval_duration >= 0.09e9
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration


def windows(stub, n):
    """Stream n chats at once; return each one's (first token, last record) times."""
    spans = [None] * n

    def run(i):
        local = ollama.Client(host=stub.url)
        times = [time.monotonic() for _ in ask(local, "x [[tokens=8]]", stream=True)]
        spans[i] = (times[0], times[-1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return sorted(spans)


def test_parallel_limit_serialises_generations(stub):
    stub.configure(tps=40)
    first, second = windows(stub, 2)
    assert second[0] < first[1]  # unlimited: the two answers overlap

    stub.configure(parallel=1)
    first, second = windows(stub, 2)
    assert second[0] >= first[1]  # one slot: the second starts after the first ends


def test_stall_holds_the_stream_then_drops_it(client, stub):
    stub.configure(stall_after=3, stall_seconds=0.3)
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        for part in ask(client, "a b c d e f", stream=True):
            received.append(part)
    assert [p.message.content for p in received] == ["Echo: a", " b", " c"]
    stub.configure(stall_after=None)
    assert ask(client, "x").done  # the slot and the server survive


def test_a_client_hanging_up_frees_its_slot(client, stub):
    stub.configure(parallel=1, stall_after=1, stall_seconds=30)
    body = {"model": CHAT, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f"{stub.url}/api/chat", json=body) as response:
        assert json.loads(next(response.iter_lines()))["message"]["content"] == "Echo: x"
    stub.configure(stall_after=None)
    start = time.monotonic()
    assert ask(client, "y").done
    assert time.monotonic() - start < 5  # not the 30 s the abandoned stall would hold


def test_stop_ends_stalled_streams_quickly(client, stub):
    stub.configure(stall_after=1, stall_seconds=30)
    threading.Timer(0.3, stub.stop).start()
    start = time.monotonic()
    with pytest.raises(httpx.HTTPError):
        list(ask(client, "x", stream=True))
    assert time.monotonic() - start < 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(stub.url)


def test_calls_log(client, stub):
    ask(client, "ciao")
    client.embed(model=EMBED, input="ciao")
    httpx.get(stub.url)  # not an /api/ call
    calls = stub.calls
    assert [c["path"] for c in calls] == ["/api/chat", "/api/embed"]
    assert [c["model"] for c in calls] == [CHAT, EMBED]
    assert calls[0]["body"]["messages"] == [{"role": "user", "content": "ciao"}]
    assert all(c["stub"] == "gpu0" and c["time"] > 0 for c in calls)
    stub.reset_calls()
    assert stub.calls == []
    # `finished - time` is the model's own time for the request, as the benches read it.
    stub.configure(tps=50, reply_tokens=10)
    ask(client, "paced")
    (chat,) = stub.calls
    assert chat["finished"] - chat["time"] >= 10 / 50


def test_configure_rejects_unknown_settings(stub):
    with pytest.raises(TypeError):
        stub.configure(tokens_per_second=3)
    with pytest.raises(TypeError):
        OllamaStub(colour="blue")


def test_http_control_endpoints(stub):
    control = f"{stub.url}/_stub"
    config = httpx.get(f"{control}/config").json()
    assert config["name"] == "gpu0" and config["chat_models"] == [CHAT]

    changed = httpx.post(f"{control}/config", json={"reply_tokens": 4, "tps": 0}).json()
    assert changed["reply_tokens"] == 4 and stub.config["reply_tokens"] == 4
    rejected = httpx.post(f"{control}/config", json={"nope": 1})
    assert rejected.status_code == 400 and "nope" in rejected.json()["error"]

    httpx.post(f"{stub.url}/api/generate", json={"model": CHAT, "prompt": "x", "stream": False})
    calls = httpx.get(f"{control}/calls").json()
    assert [c["path"] for c in calls] == ["/api/generate"]
    assert httpx.delete(f"{control}/calls").status_code == 200
    assert httpx.get(f"{control}/calls").json() == []


def test_one_connection_serves_plain_and_streamed_replies(stub):
    conn = http.client.HTTPConnection(stub.url.removeprefix("http://"), timeout=5)
    body = {"model": CHAT, "messages": [{"role": "user", "content": "x [[tokens=2]]"}]}
    for stream in (False, True, False):
        conn.request("POST", "/api/chat", json.dumps({**body, "stream": stream}))
        response = conn.getresponse()
        lines = response.read().decode().splitlines()
        assert response.status == 200
        expected = "application/x-ndjson" if stream else "application/json; charset=utf-8"
        assert response.getheader("Content-Type") == expected
        assert len(lines) == (3 if stream else 1) and json.loads(lines[-1])["done"]
    conn.request("GET", "/api/version")
    assert json.loads(conn.getresponse().read()) == {"version": "0.12.0"}
    conn.close()


def test_command_line_runs_until_sigterm():
    script = Path(__file__).resolve().parent / "ollama_stub.py"
    args = [sys.executable, str(script), "--port", "0", "--name", "gpu7", "--reply-tokens", "3"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("ollama stub gpu7 listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        reply = ollama.Client(host=url).generate(model=CHAT, prompt="uno")
        assert reply.response == "Echo: uno uno uno"
        # another process, another hash seed: the vectors must not change
        remote = ollama.Client(host=url).embed(model=EMBED, input="Città di Pisa")
        assert remote.embeddings[0] == embed_text("Città di Pisa", 256)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
