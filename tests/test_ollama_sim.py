"""The Ollama stand-in's scheduler: loads, evictions, slots, queue limit, runner options.

Placement is judged against these behaviours, so each one is pinned here through the real
``ollama`` client. Durations are scaled down (``time_scale``) to keep the tests quick.
"""

import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ollama_stub import FOREVER, MAX_QUEUE_ERROR, OllamaStub  # noqa: E402

GB = 10**9
SMALL, BIG, HUGE = "mistral:7b", "qwen2.5:14b", "llama3.1:70b"
MODELS = {
    SMALL: {"size": 6 * GB, "load_s": 10.0},
    BIG: {"size": 9 * GB, "load_s": 20.0},
    HUGE: {"size": 40 * GB, "load_s": 60.0},
}
SCALE = 0.005  # 10 s of simulated load -> 50 ms


@pytest.fixture
def sim():
    with OllamaStub(
        name="gpu0",
        chat_models=[SMALL, BIG, HUGE],
        models=MODELS,
        gpus=[16 * GB],
        time_scale=SCALE,
    ) as running:
        yield running


@pytest.fixture
def client(sim):
    return ollama.Client(host=sim.url)


def ask(client, model, text="x [[tokens=3]]", **kwargs):
    return client.chat(model=model, messages=[{"role": "user", "content": text}], **kwargs)


def loads(sim):
    return [(e["model"], e["reason"]) for e in sim.events if e["event"] == "load"]


def unloads(sim):
    return [(e["model"], e["reason"]) for e in sim.events if e["event"] == "unload"]


def test_a_model_is_loaded_before_its_first_token_once(client, sim):
    assert client.ps().models == []
    first = ask(client, SMALL)
    # 10 s of simulated load at the time scale, reported as Ollama reports it
    assert first.load_duration >= 10 * SCALE * 1e9
    again = ask(client, SMALL)
    assert again.load_duration < first.load_duration / 2
    assert loads(sim) == [(SMALL, "request")]

    (resident,) = client.ps().models
    assert resident.model == SMALL and resident.size_vram == 6 * GB
    assert resident.expires_at is not None


def test_the_least_recently_used_idle_model_is_evicted_when_memory_is_short(client, sim):
    sim.configure(gpus=[16 * GB], chat_models=[SMALL, BIG, "tiny:1b"])
    sim.configure(models={**MODELS, "tiny:1b": {"size": 2 * GB, "load_s": 1.0}})
    ask(client, SMALL)  # 6 GB
    ask(client, "tiny:1b")  # 8 GB in all
    ask(client, SMALL)  # SMALL used last, tiny is the least recently used
    ask(client, BIG)  # 9 GB more: 16 GB hold SMALL and BIG only after tiny goes
    assert unloads(sim) == [("tiny:1b", "evicted")]
    assert {m.model for m in client.ps().models} == {SMALL, BIG}
    ask(client, "tiny:1b")  # 16 GB are full: SMALL is now the least recently used
    assert unloads(sim)[-1] == (SMALL, "evicted")
    assert len(loads(sim)) == 4  # the last SMALL request found it resident


def test_a_busy_model_is_not_evicted_the_request_waits(sim):
    sim.configure(gpus=[10 * GB], tps=200, time_scale=1.0)
    sim.configure(models={SMALL: {"size": 6 * GB}, BIG: {"size": 9 * GB}})
    done = []

    def slow():
        local = ollama.Client(host=sim.url)
        done.append(("small", ask(local, SMALL, "x [[tokens=40]]")))

    thread = threading.Thread(target=slow)
    thread.start()
    while not any(e["event"] == "load" for e in sim.events):
        threading.Event().wait(0.01)
    done.append(("big", ask(ollama.Client(host=sim.url), BIG)))
    thread.join(10)
    # BIG needed SMALL's memory, so it waited until SMALL's answer had finished
    assert [name for name, _ in done] == ["small", "big"]
    assert unloads(sim) == [(SMALL, "evicted")]


def test_a_model_bigger_than_one_card_spreads_over_the_cards(client, sim):
    sim.configure(gpus=[24 * GB, 24 * GB])
    ask(client, HUGE)
    (load,) = [e for e in sim.events if e["event"] == "load"]
    assert load["cards"] == [0, 1]
    ask(client, BIG)  # 8 GB left in all, 4 per card: the 9 GB model evicts HUGE
    assert unloads(sim) == [(HUGE, "evicted")]

    sim.configure(gpus=[24 * GB])
    with pytest.raises(ollama.ResponseError) as err:
        ask(client, HUGE)
    assert err.value.status_code == 500 and "more system memory" in err.value.error


def test_tags_list_the_pulled_models_and_others_are_not_found(client, sim):
    assert {m.model for m in client.list().models} == {SMALL, BIG, HUGE, "bge-m3:latest"}
    assert {m.model: m.size for m in client.list().models}[BIG] == 9 * GB
    with pytest.raises(ollama.ResponseError) as err:
        ask(client, "gemma3:27b")
    assert err.value.status_code == 404 and "not found" in err.value.error
    assert sim.events == []


def test_another_num_ctx_reloads_the_model(client, sim):
    ask(client, SMALL, options={"num_ctx": 8192})
    ask(client, SMALL, options={"num_ctx": 8192})
    assert len(loads(sim)) == 1
    ask(client, SMALL)  # no num_ctx: the server's default (4096) differs
    assert unloads(sim) == [(SMALL, "num_ctx changed")]
    assert len(loads(sim)) == 2
    assert client.ps().models[0].context_length == 4096


def test_keep_alive_from_the_server_unless_the_request_sends_one(client, sim):
    sim.configure(keep_alive=-1)  # OLLAMA_KEEP_ALIVE=-1
    ask(client, SMALL)
    assert client.ps().models[0].expires_at.year == int(FOREVER[:4])

    ask(client, SMALL, keep_alive="2s")  # a request's keep_alive wins over the server's
    threading.Event().wait(2 * SCALE + 0.05)
    assert client.ps().models == []
    assert unloads(sim) == [(SMALL, "expired")]

    sim.configure(keep_alive=300)
    ask(client, SMALL)
    unload = client.generate(model=SMALL, prompt="", keep_alive=0)
    assert unload.done_reason == "unload" and client.ps().models == []


def test_parallel_slots_and_a_full_queue_answers_503(sim):
    sim.configure(parallel=1, max_queue=1, tps=20, time_scale=1.0, models={})
    results = []

    def run():
        try:
            ask(ollama.Client(host=sim.url), SMALL, "x [[tokens=40]]")
            results.append("ok")
        except ollama.ResponseError as exc:
            results.append((exc.status_code, exc.error))

    def waiting():
        with sim._lock:
            return sim._pending

    threads = [threading.Thread(target=run) for _ in range(3)]
    threads[0].start()  # takes the one slot for 2 s
    wait_until(lambda: loads(sim))
    threads[1].start()  # waits in the queue
    wait_until(lambda: waiting() == 1)
    threads[2].start()  # finds the queue full
    for thread in threads:
        thread.join(15)
    assert sorted(results, key=str) == sorted(["ok", "ok", (503, MAX_QUEUE_ERROR)], key=str)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_error_line_after_some_tokens(client, sim):
    sim.configure(error_after=2, fail_message="llama runner process has terminated")
    received = []
    with pytest.raises(ollama.ResponseError) as err:
        for part in ask(client, SMALL, "a b c d", stream=True):
            received.append(part.message.content)
    assert received == ["Echo: a", " b"]
    assert err.value.error == "llama runner process has terminated"
    raw = httpx.post(
        f"{sim.url}/api/chat",
        json={"model": SMALL, "messages": [{"role": "user", "content": "a b c"}]},
    )
    assert raw.status_code == 200 and raw.text.splitlines()[-1] == (
        '{"error": "llama runner process has terminated"}'
    )


def test_simulated_speeds_per_model(client, sim):
    sim.configure(models={SMALL: {"size": GB, "prompt_tps": 100.0, "tps": 10.0}})
    reply = ask(client, SMALL, "uno due tre quattro [[tokens=4]]")
    # 5 prompt words at 100/s and 4 tokens at 10/s, both scaled
    assert reply.prompt_eval_duration >= 5 / 100 * SCALE * 1e9
    assert reply.eval_duration >= 4 / 10 * SCALE * 1e9
