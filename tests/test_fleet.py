"""A fleet of GPU workers over time: models stay resident as each Ollama is configured,
and no request makes Ollama reload a model for differing runner options."""

from __future__ import annotations

import pytest
from django.test import override_settings

from core import llm
from tests.ollama_stub import FOREVER, OllamaStub
from tests.processes import wait_for
from tests.test_pipeline import ask, poll

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


# --- routing and placement, with real workers ---------------------------------------------

ALPHA, BETA = "alpha:14b", "beta:14b"
GB = 10**9
FLEET_SCALE = 0.02  # a 10 s load takes 0.2 s
PLACEMENT_ENV = {
    "RMASSIMO_PLACEMENT": "models",
    "RMASSIMO_PLACEMENT_TICK_S": "0.05",
    "RMASSIMO_PLACEMENT_WINDOW_S": "3",
    "RMASSIMO_PLACEMENT_LOAD_S": "0.2",
    "RMASSIMO_PLACEMENT_SERVICE_S": "0.1",
}


@pytest.fixture
def fleet(own_workers, var_dir, settings):
    """Start simulated servers and their workers with model placement: fleet(models, ...)."""
    from tests.processes import Worker

    settings.RMASSIMO_PLACEMENT = "models"
    started = []

    def start(*pulled: list[str]):
        sims = []
        for i, models in enumerate(pulled):
            sim = OllamaStub(
                name=f"gpu{i}",
                chat_models=models,
                embed_models=[EMBED],
                gpus=[24 * GB],  # one 14 GB model at a time
                models={m: {"size": 14 * GB, "load_s": 10.0} for m in (ALPHA, BETA)},
                keep_alive=-1,
                parallel=1,
                tps=100,
                time_scale=FLEET_SCALE,
            ).start()
            worker = Worker(
                name=f"gpu{i}@fleet",
                queues=[f"gpu.{i}@fleet"],
                ollama_url=sim.url,
                gpu=f"gpu{i}",
                log_dir=var_dir / "logs",
                extra_env=PLACEMENT_ENV,
            )
            started.append((sim, worker))
            sims.append(sim)
        wait_for(
            lambda: len([w for w in _fleet_workers() if w["models"] and w["serving"]]) == len(sims),
            timeout=60,
            what="every worker listing its models and serving one",
        )
        return sims

    yield start
    for sim, worker in started:
        worker.stop()
        sim.stop()
    from workers.celery import app

    app.control.purge()


def _fleet_workers():
    from workers import health

    return [w for w in health.workers() if w["name"].endswith("@fleet") and w["online"]]


def _listed(api):
    return {w["gpu"]: w for w in api.staff.get("/api/v1/workers/").json() if "@fleet" in w["name"]}


def _corpus(model):
    from ingestion.models import Corpus

    return Corpus.objects.get(slug=model.replace(":", "-"))


@pytest.fixture
def corpora(worker, transactional_db):
    """One corpus per model, indexed by the session's workers before the fleet's start (a
    question whose retrieval finds nothing is answered without the model)."""
    from tests.corpus import build_corpus

    docs = {"faq.txt": "Every question about alpha and beta and gamma gets its answer here."}
    for model in (ALPHA, BETA, "gamma:7b"):
        build_corpus(model.replace(":", "-"), docs, chat_model=model, embed_model="none")


def _chats(sim, model=None):
    return [
        c for c in sim.calls if c["path"] == "/api/chat" and (model is None or c["model"] == model)
    ]


@pytest.mark.django_db(transaction=True)
def test_a_model_a_server_lacks_is_never_sent_there(corpora, fleet, api):
    both, alpha_only = fleet([ALPHA, BETA], [ALPHA])
    listed = _listed(api)
    assert listed["gpu1"]["models"] == [ALPHA, "bge-m3:latest"]
    assert set(listed["gpu0"]["models"]) == {ALPHA, BETA, "bge-m3:latest"}

    ids = [
        ask(api.owner, text=f"beta question {i} [[tokens=5]]", corpus=_corpus(BETA).slug)["id"]
        for i in range(6)
    ] + [
        ask(api.owner, text=f"alpha question {i} [[tokens=5]]", corpus=_corpus(ALPHA).slug)["id"]
        for i in range(6)
    ]
    results = [poll(api.owner, i, timeout=60) for i in ids]
    assert all(r["status"] == "done" for r in results), [r["error"] for r in results]
    assert not _chats(alpha_only, BETA)  # never sent where it is not pulled
    assert {r["gpu"] for r in results[:6]} == {"gpu0"}
    assert _listed(api)["gpu1"]["serving"] == ALPHA
    # `loaded` is what each worker's Ollama has resident (/api/ps)
    wait_for(
        lambda: (
            [_listed(api)[f"gpu{i}"]["loaded"] for i in (0, 1)]
            == [sorted(r.model for r in sim.resident()) for sim in (both, alpha_only)]
        ),
        what="the workers to show their loaded models",
    )
    assert _listed(api)["gpu0"]["loaded"]  # it answered BETA, which stays resident

    # A model no server has fails at once, naming the model and how to pull it.
    posted = ask(api.owner, text="gamma?", corpus=_corpus("gamma:7b").slug)
    assert posted["status"] == "failed"
    assert "gamma:7b" in posted["error"] and "ollama pull gamma:7b" in posted["error"]
    assert not [c for s in (both, alpha_only) for c in _chats(s, "gamma:7b")]


@pytest.mark.django_db(transaction=True)
def test_a_shuffled_mix_loads_each_card_about_once(corpora, fleet, api):
    import random

    sims = fleet([ALPHA, BETA], [ALPHA, BETA], [ALPHA, BETA])
    for sim in sims:
        sim.reset_events()
    models = [ALPHA] * 16 + [BETA] * 8
    random.Random(3).shuffle(models)
    ids = [
        ask(api.owner, text=f"question {i} [[tokens=10]]", corpus=_corpus(m).slug)["id"]
        for i, m in enumerate(models)
    ]
    results = [poll(api.owner, i, timeout=120) for i in ids]
    assert all(r["status"] == "done" for r in results), [r["error"] for r in results]
    loads = {s.config["name"]: [e["model"] for e in s.events if e["event"] == "load"] for s in sims}
    # Each card loads a model about once (a shared queue swaps at nearly every question).
    assert sum(len(v) for v in loads.values()) <= len(sims) + 2, loads
    assert {r["gpu"] for r in results} == {"gpu0", "gpu1", "gpu2"}
