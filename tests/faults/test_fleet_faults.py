"""Faults of a fleet with placement: a model load longer than the answer's lease."""

from __future__ import annotations

import pytest
from django.conf import settings

from tests.faults.test_faults import final

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

DOCS = {"vesuvius.txt": "Vesuvius buried Pompeii and Herculaneum in 79 AD under ash and pumice."}


@pytest.fixture
def models_mode(monkeypatch):
    # Before the stack starts: its web, beat and workers route and place by model.
    monkeypatch.setenv("RMASSIMO_PLACEMENT", "models")
    monkeypatch.setattr(settings, "RMASSIMO_PLACEMENT", "models")


def test_a_model_load_three_leases_long_gives_one_generation(models_mode, fault_stack, tmp_path):
    """The card must load the model before the first token, for three times the lease: the
    attempt keeps the question all the while, so no other card generates it again."""
    lease_s = float(fault_stack.env["RMASSIMO_LEASE_S"])
    chat = settings.RMASSIMO_CHAT_MODEL
    cards = [
        fault_stack.stub(f"gpu{i}", tps=50, reply_tokens=10, models={chat: {"load_s": 3 * lease_s}})
        for i in (0, 1)
    ]
    for i, card in enumerate(cards):
        fault_stack.worker(
            f"gpu{i}",
            stub=card,
            queues=[f"gpu.{i}@faults"],
            RMASSIMO_OLLAMA_TIMEOUT=str(10 * lease_s),
            RMASSIMO_PLACEMENT_TICK_S="0.2",
        )
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    fault_stack.ingest(folder)
    pk = fault_stack.ask("What did Vesuvius bury?")
    result = final(fault_stack, pk, timeout=90)
    assert result["status"] == "done", result["error"]
    generations = [c for card in cards for c in card.calls if c["path"] == "/api/chat"]
    assert len(generations) == 1
    assert result["attempts"] == 1
    answered = next(card for card in cards if card.config["name"] == result["gpu"])
    (load,) = [e for e in answered.events if e["event"] == "load" and e["model"] == chat]
    assert load["seconds"] >= 3 * lease_s
