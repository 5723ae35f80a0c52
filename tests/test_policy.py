"""The placement policy's rules, one situation each (the same function runs in the workers)."""

from __future__ import annotations

from workers.placement import ordered
from workers.policy import View, choose

A, B = "alpha:14b", "beta:14b"


def view(**kw) -> View:
    base = {
        "serving": A,
        "pulled": {A, B},
        "resident": {A},
        "service_s": {A: 2.75, B: 2.75},
        "load_s": {A: 10.0, B: 10.0},
    }
    return View(**{**base, **kw})


def test_a_worker_keeps_its_loaded_model_while_work_waits_for_it():
    # B has a much longer backlog, but A has work and B has a server: no swap.
    assert choose(view(waiting={A: 1, B: 40}, servers={A: 0, B: 1})) == A


def test_every_model_with_waiting_work_gets_a_worker():
    # B waits with nobody serving it; A keeps another server: this one goes.
    assert choose(view(waiting={A: 5, B: 1}, servers={A: 1, B: 0})) == B
    # ... but not as A's last server while A has work of its own.
    assert choose(view(waiting={A: 5, B: 1}, servers={A: 0, B: 0})) == A
    # A busy worker leaves the orphan to an idle one that can take it.
    busy = view(waiting={A: 5, B: 1}, servers={A: 2, B: 0}, idle_servers={A: 1}, busy=True)
    assert choose(busy) == A


def test_a_worker_leaves_only_if_the_others_carry_its_models_arrivals():
    # 80/20 at 80% of four cards: A needs 2.6 cards of work. With A's queue empty for an
    # instant, one of A's three servers must not leave for B's backlog.
    rates = {A: 2.56 / 2.75, B: 0.64 / 2.75}
    assert choose(view(waiting={A: 0, B: 8}, servers={A: 2, B: 1}, rate=rates)) == A
    # Once the mix has turned (20/80), A's arrivals need one card: B, short of servers,
    # gets this one.
    turned = {A: 0.64 / 2.75, B: 2.56 / 2.75}
    assert choose(view(waiting={A: 0, B: 8}, servers={A: 2, B: 1}, rate=turned)) == B


def test_a_swap_must_be_worth_the_load():
    # B's servers carry its arrivals and its backlog clears in less than a load: stay.
    calm = {A: 0.0, B: 0.3}
    assert choose(view(waiting={A: 0, B: 2}, servers={A: 1, B: 2}, rate=calm)) == A
    # The same backlog, with B already resident here, costs nothing to take.
    resident = view(waiting={A: 0, B: 2}, servers={A: 1, B: 2}, rate=calm, resident={A, B})
    assert choose(resident) == B


def test_a_starting_worker_takes_the_model_that_most_needs_a_server():
    start = view(serving=None, resident=set(), waiting={A: 3, B: 1}, servers={A: 2, B: 0})
    assert choose(start) == B
    assert choose(view(serving=None, pulled={A})) == A
    assert choose(view(serving=None, pulled=set())) is None


def test_questions_go_ahead_of_embedding_batches(settings):
    settings.RMASSIMO_PLACEMENT = "models"
    queues = ordered(A, ["interactive", "batch", "gpu.0@host", "cpu"], ["bge-m3:latest"])
    assert queues == [
        f"interactive.{A}",
        "interactive",
        "gpu.0@host",
        "batch.bge-m3:latest",
        "batch",
        "cpu",
    ]
