"""manage.py ask "..." --corpus SLUG [--user NAME]

Goes through the same queue and GPU worker as the API; prints the answer as it streams,
then its sources. The question is recorded in a new conversation of NAME (by default
`admin`, the user the run command creates), so it can be followed in that person's chat.
"""

import asyncio
import sys

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from chat import services
from chat.models import Question
from core import realtime
from ingestion import selectors

_POLL_S = 1.0
DEFAULT_USER = "admin"


class Command(BaseCommand):
    help = "Ask a question of a corpus and print the answer as it streams."

    def add_arguments(self, parser):
        parser.add_argument("text")
        parser.add_argument("--corpus", required=True)
        parser.add_argument(
            "--user",
            default=DEFAULT_USER,
            help=f"Whose chat shows the question (default: {DEFAULT_USER}); the user must exist.",
        )
        parser.add_argument("--timeout", type=float, default=600)

    def handle(self, *args, **options):
        text = options["text"].strip()
        if not text:
            raise CommandError("The question is empty.")
        corpus = selectors.corpus_by_slug(options["corpus"])
        if corpus is None:
            raise CommandError(f"Unknown corpus '{options['corpus']}'.")
        user = get_user_model().objects.filter(username=options["user"]).first()
        if user is None:
            raise CommandError(
                f"No user '{options['user']}': name one with --user, or create it with "
                "manage.py createsuperuser."
            )
        conversation = services.conversation_create(owner=user, corpus=corpus, title=text[:80])
        question = asyncio.run(self._ask(conversation, text, options["timeout"]))
        if question.status != Question.Status.DONE:
            raise CommandError(f"The question {question.status}: {question.error}")
        self.stdout.write("\n\nSources:")
        for number, source in enumerate(question.sources, start=1):
            page = f", page {source['page']}" if source.get("page") else ""
            snippet = " ".join(source["text"].split())[:160]
            self.stdout.write(
                f"  [{number}] {source['title']}{page} (score {source['score']:.3f}): {snippet}"
            )

    async def _ask(self, conversation, text: str, timeout: float) -> Question:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        # Follow the conversation before the question exists, so no delta is missed.
        await layer.group_add(realtime.group_name(conversation.pk), channel)
        question = await sync_to_async(services.question_create)(
            owner=conversation.owner, text=text, conversation=conversation
        )
        printed = -1
        shown = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                try:
                    message = await asyncio.wait_for(layer.receive(channel), timeout=_POLL_S)
                except TimeoutError:
                    message = None
                event = (message or {}).get("event", {})
                if message is not None and event.get("question") != question.pk:
                    continue
                if event.get("type") == "delta" and event["seq"] > printed:
                    # Fill any gap from the stored partial text before printing live.
                    missing = range(printed + 1, event["seq"])
                    parts = (
                        await sync_to_async(realtime.partial_answer)(
                            question.pk, event.get("attempt", 0)
                        )
                        if missing
                        else []
                    )
                    text = (
                        "".join(parts[seq] for seq in missing if seq < len(parts)) + event["text"]
                    )
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    shown += len(text)
                    printed = event["seq"]
                    continue
                if event.get("type") == "started":
                    self.stderr.write(f"(answering on {event.get('gpu')})")
                    continue
                await sync_to_async(question.refresh_from_db)()
                if question.is_final:
                    if question.status == Question.Status.DONE:
                        sys.stdout.write(question.answer[shown:])
                    return question
            raise CommandError("No answer in time; is a worker running (manage.py run_workers)?")
        finally:
            await layer.group_discard(realtime.group_name(conversation.pk), channel)
