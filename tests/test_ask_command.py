"""`manage.py ask` run as a real process: the question lands in the named person's chat."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client

from chat.management.commands.ask import Command as AskCommand
from chat.models import Conversation
from ingestion.models import Corpus
from tests.corpus import build_corpus
from tests.processes import ROOT, worker_env

pytestmark = pytest.mark.django_db(transaction=True)


def ask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "ask", *args, "--timeout", "60"],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_question_asked_for_a_user_shows_in_their_chat(live, make_user):
    build_corpus()
    alice, bob = make_user("alice"), make_user("bob")
    result = ask("When did Vesuvius bury Pompeii?", "--corpus", "demo", "--user", "alice")
    assert result.returncode == 0, result.stderr
    assert "Sources:" in result.stdout

    conversation = Conversation.objects.get()
    assert conversation.owner == alice
    question = conversation.questions.get()
    assert question.status == "done"
    assert question.answer in result.stdout

    as_alice, as_bob = Client(), Client()
    as_alice.force_login(alice)
    as_bob.force_login(bob)
    page = as_alice.get(f"/c/{conversation.pk}/")
    assert page.status_code == 200
    assert "When did Vesuvius bury Pompeii?" in page.content.decode()
    assert "When did Vesuvius bury Pompeii?" in as_alice.get("/").content.decode()
    assert as_bob.get(f"/c/{conversation.pk}/").status_code == 404


def test_an_unknown_user_is_refused_and_the_default_is_the_run_commands_user(make_user):
    Corpus.objects.create(slug="demo", name="Demo")
    with pytest.raises(CommandError, match="No user 'nobody'"):
        call_command(
            "ask", "Anyone there?", "--corpus", "demo", "--user", "nobody", "--timeout", "2"
        )
    # Nobody is created on the fly, and nothing is asked.
    assert not get_user_model().objects.filter(username="nobody").exists()
    assert not Conversation.objects.exists()
    parser = AskCommand().create_parser("manage.py", "ask")
    assert parser.get_default("user") == "admin"
