"""A fleet of GPU workers over time: models stay resident as each Ollama is configured,
and no request makes Ollama reload a model for differing runner options."""

from __future__ import annotations

import pytest
from django.test import override_settings

from core import llm
from tests.ollama_stub import FOREVER, OllamaStub

CHAT, EMBED = "llama3.1:8b", "bge-m3"
MESSAGES = [{"role": "user", "content": "Dov'è Pisa? [[tokens=3]]"}]


@pytest.fixture
def sim():
    """An Ollama configured with OLLAMA_KEEP_ALIVE=-1, on one 24 GB card."""
    with OllamaStub(
        name="gpu0",
        chat_models=[CHAT],
        embed_models=[EMBED],
        gpus=[24 * 10**9],
        keep_alive=-1,
        models={CHAT: {"load_s": 10.0}, EMBED: {"load_s": 1.0}},
        time_scale=0.002,
    ) as running:
        yield running


@pytest.fixture
def ollama_backend():
    with override_settings(RMASSIMO_LLM_BACKEND="ollama"):
        llm.forget_backend()
        yield
    llm.forget_backend()


def use_every_path(url):
    """What a worker sends its Ollama: an answer, a condensed question, embeddings, a probe."""
    list(llm.stream_chat(MESSAGES, model=CHAT, base_url=url, stats=llm.StreamStats()))
    llm.complete_chat(MESSAGES, model=CHAT, base_url=url)
    llm.embed_texts(["uno", "due"], model=EMBED, base_url=url)
    llm.embed_query("tre", model=EMBED, base_url=url)
    assert llm.probe(model=CHAT, base_url=url) is None


def test_models_stay_resident_as_the_server_is_configured(sim, ollama_backend):
    use_every_path(sim.url)
    assert all("keep_alive" not in call["body"] for call in sim.calls)
    # OLLAMA_KEEP_ALIVE=-1 holds: both models stay loaded for ever
    assert {m["name"]: m["expires_at"] for m in _ps(sim)} == {
        CHAT: FOREVER,
        "bge-m3:latest": FOREVER,
    }

    with override_settings(RMASSIMO_OLLAMA_KEEP_ALIVE="-1"):
        llm.complete_chat(MESSAGES, model="llama3.1:8b", base_url=sim.url + "/")
    # an operator's own keep_alive is sent, "-1" as a number (Ollama refuses it as a string)
    assert sim.calls[-1]["body"]["keep_alive"] == -1


def test_every_call_sends_the_same_runner_options_so_nothing_reloads(sim, ollama_backend):
    use_every_path(sim.url)
    use_every_path(sim.url)
    chat_calls = [c for c in sim.calls if c["model"] == CHAT]
    assert {c["body"]["options"]["num_ctx"] for c in chat_calls} == {8192}
    loads = [(e["model"], e["reason"]) for e in sim.events if e["event"] == "load"]
    assert sorted(loads) == [("bge-m3:latest", "request"), (CHAT, "request")]
    assert not [e for e in sim.events if e["event"] == "unload"]


def _ps(sim):
    import httpx

    return httpx.get(f"{sim.url}/api/ps").json()["models"]
