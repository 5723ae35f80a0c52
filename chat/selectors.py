"""Reads: every query here is scoped to the person asking."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from chat.models import Conversation, Question


def conversations_of(user: AbstractBaseUser) -> QuerySet[Conversation]:
    return Conversation.objects.filter(owner=user).select_related("corpus")


def questions_of(user: AbstractBaseUser) -> QuerySet[Question]:
    return Question.objects.filter(conversation__owner=user).select_related("conversation__corpus")
