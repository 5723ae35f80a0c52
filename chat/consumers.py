"""The live stream of one conversation over a websocket.

The worker publishes events to the conversation's channel-layer group (core/realtime.py);
this consumer forwards them as JSON. A client that connects while an answer streams first
gets the text so far, then the live deltas, with no gap and no duplicate: it joins the
group BEFORE reading the stored parts, so anything published after the read also arrives
live, and live deltas whose sequence number was already replayed are dropped.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from chat import selectors
from chat.models import Conversation, Question
from core import metrics, realtime

CLOSE_UNAUTHENTICATED = 4401
# Someone else's conversation closes like a missing one, as the HTTP API answers 404 to
# both: a different code would tell which ids exist.
CLOSE_NOT_FOUND = 4404
_MAX_ID = 2**63 - 1  # past a bigint column: no such row, and no database error

_FINAL_EVENTS = {"done", "failed", "cancelled"}


@database_sync_to_async
def _owner_of(conversation_id: int) -> int | None:
    return (
        Conversation.objects.filter(pk=conversation_id).values_list("owner_id", flat=True).first()
    )


@database_sync_to_async
def _replay_events(conversation_id: int) -> list[dict]:
    """Events that bring a new client up to date on answers not finished yet."""
    events: list[dict] = []
    pending = Question.objects.filter(
        conversation_id=conversation_id,
        status__in=[Question.Status.QUEUED, Question.Status.RUNNING],
    ).order_by("created_at", "id")
    for question in pending:
        if question.status == Question.Status.QUEUED:
            position = selectors.queue_position(question)
            events.append({"type": "queued", "question": question.pk, "position": position})
            continue
        events.append(
            {
                "type": "started",
                "question": question.pk,
                "gpu": question.gpu,
                "attempt": question.attempts,
            }
        )
        for seq, text in enumerate(realtime.partial_answer(question.pk, question.attempts)):
            events.append(
                {
                    "type": "delta",
                    "question": question.pk,
                    "attempt": question.attempts,
                    "seq": seq,
                    "text": text,
                }
            )
    return events


class ConversationConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        self.group = None
        # What the replay sent, so that a live copy of it is dropped: the highest seq per
        # question, the attempt each running question was replayed at, replayed queued ones.
        self.replayed_seq: dict[int, int] = {}
        self.replayed_attempt: dict[int, int | None] = {}
        self.replayed_queued: set[int] = set()
        # The newest attempt seen per question: deltas of an older one, which lost its
        # claim but streamed a little longer, are not shown.
        self.attempt: dict[int, int] = {}

        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return await self._refuse(CLOSE_UNAUTHENTICATED)
        conversation_id = int(self.scope["url_route"]["kwargs"]["conversation_id"])
        owner_id = await _owner_of(conversation_id) if conversation_id <= _MAX_ID else None
        if owner_id is None or owner_id != user.pk:
            return await self._refuse(CLOSE_NOT_FOUND)

        self.group = realtime.group_name(conversation_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        metrics.websocket_opened()
        # Live events wait in this consumer's channel until connect() returns.
        for event in await _replay_events(conversation_id):
            question = event["question"]
            if event["type"] == "delta":
                self.replayed_seq[question] = event["seq"]
            elif event["type"] == "started":
                self.replayed_attempt[question] = event.get("attempt")
                self._saw_attempt(question, event.get("attempt"))
            else:
                self.replayed_queued.add(question)
            await self.send_json(event)

    async def _refuse(self, code: int) -> None:
        # Accept first: a close before the handshake completes reaches the client as a
        # bare HTTP 403, without the code that says why.
        await self.accept()
        await self.close(code=code)

    async def disconnect(self, code):
        if self.group is not None:
            metrics.websocket_closed()
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # The stream is one way; questions, stops and feedback go through the HTTP API.
        return

    async def rm_event(self, message):
        event = message["event"]
        if self._already_sent(event):
            return
        await self.send_json(event)

    def _saw_attempt(self, question: int, attempt: int | None) -> None:
        if attempt is not None:
            self.attempt[question] = max(attempt, self.attempt.get(question, attempt))

    def _already_sent(self, event: dict) -> bool:
        kind, question = event.get("type"), event.get("question")
        if kind == "delta":
            attempt = event.get("attempt")
            if attempt is not None and attempt < self.attempt.get(question, attempt):
                return True
            return event.get("seq", -1) <= self.replayed_seq.get(question, -1)
        if kind == "queued":
            if question in self.replayed_queued:
                self.replayed_queued.discard(question)
                return True
            return False
        if kind == "started":
            self._saw_attempt(question, event.get("attempt"))
            if question in self.replayed_attempt:
                replayed = self.replayed_attempt.pop(question)
                if event.get("attempt") in (replayed, None):
                    return True
            # A new attempt: its parts were cleared and its seqs start again at 0.
            self.replayed_seq.pop(question, None)
            return False
        if kind in _FINAL_EVENTS:
            self.replayed_seq.pop(question, None)
            self.replayed_attempt.pop(question, None)
            self.replayed_queued.discard(question)
        return False
