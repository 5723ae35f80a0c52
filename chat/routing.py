from channels.security.websocket import WebsocketDenier
from django.urls import path, re_path

from chat import consumers

websocket_urlpatterns = [
    path(
        "ws/conversations/<int:conversation_id>/",
        consumers.ConversationConsumer.as_asgi(),
        name="ws-conversation",
    ),
    # Any other path is refused at the handshake (HTTP 403) instead of failing in the
    # router with a server error.
    re_path(r"", WebsocketDenier.as_asgi()),
]
