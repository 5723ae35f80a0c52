"""Nobody let in, checked through the real server (daphne) and, for URL ingestion, the real
worker: internal addresses refused, one permission model for the API and the admin, worker
details for those allowed, websocket refusals that tell nothing, throttled logins and
tokens, proxy headers believed only behind a proxy, and the limits on what a request may
cost. docs/security.md states each promise."""

from __future__ import annotations

import asyncio
import io
import re
import secrets
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import websockets
from asgiref.sync import async_to_sync
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from websockets.asyncio.client import connect as ws_connect

from chat import services as chat_services
from chat.models import Conversation, Question
from ingestion import fetching, parsing, services
from ingestion.models import Document, IngestionJob
from tests.browser import Daphne
from tests.conftest import OPERATOR_PERMISSIONS
from tests.corpus import build_corpus
from tests.ingestion_helpers import LocalSite, Route, wait_job
from tests.processes import free_port, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

CONVERSATION_RATE = 3
MAX_PAGE = 5
DOCX_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, var_dir, ollama):
    """The real ASGI app with small limits, so that reaching them is cheap."""
    with django_db_blocker.unblock():
        daphne = Daphne(
            log_dir=var_dir / "logs",
            extra_env={
                "OLLAMA_URLS": ollama.url,
                "RMASSIMO_OLLAMA_URL": ollama.url,
                "RMASSIMO_CONVERSATION_RATE": f"{CONVERSATION_RATE}/min",
                "RMASSIMO_MAX_PAGE_SIZE": str(MAX_PAGE),
                "RMASSIMO_DOCX_MAX_UNPACKED_BYTES": str(DOCX_LIMIT),
            },
        )
    yield daphne
    daphne.stop()


@pytest.fixture(autouse=True)
def fresh_budgets():
    """Wrong tokens counted against 127.0.0.1 must not refuse the next test's tokens."""
    yield
    cache.delete("bad-token:127.0.0.1")


def client(server, user=None) -> httpx.Client:
    headers = {}
    if user is not None:
        headers["Authorization"] = f"Token {Token.objects.get_or_create(user=user)[0].key}"
    return httpx.Client(base_url=server.url, headers=headers, trust_env=False, timeout=30)


def csrf_of(http: httpx.Client, path: str) -> str:
    page = http.get(path)
    assert page.status_code == 200, (path, page.status_code)
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)


def log_in(http: httpx.Client, username: str, password: str, path: str = "/accounts/login/"):
    token = csrf_of(http, path)
    return http.post(
        path,
        data={"username": username, "password": password, "csrfmiddlewaretoken": token},
    )


# ---- URL ingestion ----


def test_internal_addresses_are_never_fetched(live, server, make_user):
    operator = make_user("operator", staff=True, permissions=OPERATOR_PERMISSIONS)
    services.corpus_get_or_create(slug="web")
    with LocalSite() as site, client(server, operator) as http:
        loopback = f"http://127.0.0.1:{site.port}"
        site.routes["/secret"] = Route(body=b"the admin's page")
        site.routes["/hop"] = Route(status=302, headers={"Location": f"{loopback}/secret"})

        def add(url):
            return http.post("/api/v1/corpora/web/documents/", json={"url": url})

        # A literal internal address is refused at once, with the one sentence.
        for url in (f"{loopback}/secret", "http://169.254.169.254/latest/meta-data/"):
            response = add(url)
            assert response.status_code == 400, response.text
            assert response.json()["url"] == [fetching.refused_message(url)]
        # An allowed host that redirects to one: the worker refuses the hop.
        hop = add(f"{site.url}/hop")
        assert hop.status_code == 202, hop.text
        # A closed port fails with the same sentence: nothing tells open from closed.
        closed_url = f"http://localhost:{free_port()}/"
        closed = add(closed_url)
        assert closed.status_code == 202
        hop_job = wait_job(hop.json()["job"]["id"])
        closed_job = wait_job(closed.json()["job"]["id"])
        assert site.count("/hop") == 1
        assert site.count("/secret") == 0
    assert hop_job.status == closed_job.status == "failed"
    assert hop_job.error == fetching.refused_message(f"{site.url}/hop")
    assert closed_job.error == fetching.refused_message(closed_url)
    shown = http_get_json(server, operator, f"/api/v1/jobs/{hop_job.pk}/")
    assert shown["error"] == hop_job.error


def http_get_json(server, user, path):
    with client(server, user) as http:
        response = http.get(path)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_name_is_checked_on_the_address_it_resolves_to(settings):
    """`localhost` is a name, not an address: it is refused on what it resolves to, unless
    the allow-list names it."""
    with LocalSite() as site:
        site.routes["/page"] = Route(body=b"inside")
        settings.RMASSIMO_FETCH_ALLOWED_HOSTS = []
        with pytest.raises(parsing.ParseError) as refused:
            fetching.fetch(f"{site.url}/page")
        assert str(refused.value) == fetching.refused_message(f"{site.url}/page")
        settings.RMASSIMO_FETCH_ALLOWED_HOSTS = ["LocalHost"]
        assert fetching.fetch(f"{site.url}/page").data == b"inside"
    assert site.count("/page") == 1


# ---- one permission model ----


def test_staff_need_the_model_permissions_in_the_api_and_the_admin(server, make_user):
    corpus, _ = services.corpus_get_or_create(slug="perm")
    document = Document.objects.create(corpus=corpus, title="kept", source="kept.txt")
    failed = IngestionJob.objects.create(document=document, status="failed", error="x")
    intern = make_user("intern", staff=True, permissions=["ingestion.view_document"])
    with client(server, intern) as http:
        files = {"file": ("new.txt", b"Some words to index.", "text/plain")}
        assert http.post("/api/v1/corpora/perm/documents/", files=files).status_code == 403
        assert http.delete(f"/api/v1/documents/{document.pk}/").status_code == 403
        assert http.get("/api/v1/jobs/").status_code == 403
        assert http.get(f"/api/v1/documents/{document.pk}/").status_code == 200  # may view
    assert list(Document.objects.values_list("source", flat=True)) == ["kept.txt"]

    def admin_action(http, path, action, pk):
        token = csrf_of(http, path)
        return http.post(
            path,
            data={"action": action, "_selected_action": [pk], "csrfmiddlewaretoken": token},
        )

    with client(server) as http:
        assert log_in(http, "intern", "pw-intern", "/admin/login/").status_code == 302
        listing = http.get("/admin/ingestion/document/").text
        assert "kept" in listing and 'value="ingest"' not in listing
        for action in ("ingest", "reingest", "remove_from_index"):
            admin_action(http, "/admin/ingestion/document/", action, document.pk)
        assert http.get("/admin/ingestion/document/upload/").status_code == 403
        assert http.get("/admin/ingestion/ingestionjob/").status_code == 403
    assert IngestionJob.objects.get() == failed  # no job was started

    # Granted `change`, the same person may start ingestion from the admin.
    from tests.conftest import grant

    grant(intern, ["ingestion.change_document"])
    with client(server) as http:
        log_in(http, "intern", "pw-intern", "/admin/login/")
        assert 'value="ingest"' in http.get("/admin/ingestion/document/").text
        admin_action(http, "/admin/ingestion/document/", "ingest", document.pk)
    assert IngestionJob.objects.count() == 2


# ---- workers ----


def test_worker_details_only_for_staff_allowed_to_see_them(live, server, api, make_user):
    corpus = build_corpus()
    live.configure(tps=10, reply_tokens=400)
    question = api.owner.post(
        "/api/v1/questions/", {"text": "Vesuvius?", "corpus": corpus.slug}, format="json"
    ).json()
    wait_for(
        lambda: Question.objects.get(pk=question["id"]).status == "running",
        timeout=30,
        what="the answer to start",
    )
    intern = make_user("intern", staff=True)

    def ours(user):
        entries = http_get_json(server, user, "/api/v1/workers/")
        return next(w for w in entries if w["name"] == "gpu0@tests")

    try:
        seen = {
            "other": ours(api.other_user),
            "intern": ours(intern),
            "staff": ours(api.staff_user),
        }
    finally:
        api.owner.post(f"/api/v1/questions/{question['id']}/cancel/")
    allowed = seen["staff"]
    assert allowed["current_job"]["args"] == [question["id"]]
    assert allowed["host"] and allowed["pid"] > 0 and allowed["ollama_url"] == live.url
    for who in ("other", "intern"):
        entry = seen[who]
        assert entry["online"] and entry["gpu"] == "gpu0"
        assert entry["current_job"]["task"] == allowed["current_job"]["task"]
        assert entry["current_job"]["args"] == [] and entry["current_job"]["id"] == ""
        assert (entry["host"], entry["pid"], entry["ollama_url"], entry["health_error"]) == (
            "",
            None,
            "",
            "",
        ), who
    with client(server) as http:
        log_in(http, "intern", "pw-intern", "/admin/login/")
        assert http.get("/admin/workers/").status_code == 403


# ---- the websocket ----


def test_websocket_tells_nothing_and_takes_only_this_site(server, api):
    corpus = build_corpus(docs={})
    mine = chat_services.conversation_create(owner=api.owner_user, corpus=corpus)
    other = {"Authorization": f"Token {Token.objects.get_or_create(user=api.other_user)[0].key}"}
    base = f"{server.ws_url}/ws/conversations"
    with client(server) as http:
        log_in(http, "owner", "pw-owner")
        cookie = f"sessionid={http.cookies['sessionid']}"

    async def close_code(url, **kwargs):
        async with ws_connect(url, proxy=None, **kwargs) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        return closed.value.rcvd.code

    async def refusal(url, **kwargs):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with ws_connect(url, proxy=None, **kwargs):
                pass
        return refused.value.response.status_code

    async def scenario():
        session = {"additional_headers": {"Cookie": cookie}}
        async with ws_connect(f"{base}/{mine.pk}/", origin=server.url, proxy=None, **session):
            pass  # the owner's own page is let in
        return {
            "other's": await close_code(f"{base}/{mine.pk}/", additional_headers=other),
            "missing": await close_code(f"{base}/{mine.pk + 1000}/", additional_headers=other),
            "huge id": await close_code(f"{base}/{2**70}/", additional_headers=other),
            "another port": await refusal(
                f"{base}/{mine.pk}/", origin=f"http://127.0.0.1:{free_port()}", **session
            ),
            "unknown path": await refusal(f"{server.ws_url}/ws/nothing/", origin=server.url),
        }

    assert async_to_sync(scenario)() == {
        "other's": 4404,
        "missing": 4404,
        "huge id": 4404,
        "another port": 403,
        "unknown path": 403,
    }
    # Refused at the handshake, not failed in the router with a server error.
    assert '"WSREJECT /ws/nothing/"' in server.output()
    assert "No route found" not in server.output()


# ---- throttling ----


def test_the_tenth_wrong_password_is_throttled(server, make_user):
    make_user("victim")
    with client(server) as http:
        codes = []
        for attempt in range(10):
            # A client's own X-Forwarded-For is no way around it: no proxy is trusted.
            http.headers["X-Forwarded-For"] = f"203.0.113.{attempt}"
            codes.append(log_in(http, "victim", f"guess-{attempt}").status_code)
        assert codes == [200] * 9 + [429]
        assert "Too many attempts" in log_in(http, "victim", "guess-x").text
        # Locked out: even the right password is refused, here and in the admin.
        assert log_in(http, "victim", "pw-victim").status_code == 429
        assert log_in(http, "victim", "pw-victim", "/admin/login/").status_code == 429
        assert "sessionid" not in http.cookies


def test_wrong_tokens_are_throttled(server, api):
    corpus = build_corpus(docs={})
    mine = chat_services.conversation_create(owner=api.owner_user, corpus=corpus)
    good = Token.objects.get_or_create(user=api.owner_user)[0].key
    with client(server) as http:
        wrong = [{"Authorization": f"Token {secrets.token_hex(20)}"} for _ in range(10)]
        codes = [http.get("/api/v1/conversations/", headers=h).status_code for h in wrong]
        assert codes == [401] * 9 + [429]
        # Past the budget every token from that address waits, the right one too.
        response = http.get("/api/v1/conversations/", headers={"Authorization": f"Token {good}"})
        assert response.status_code == 429 and "Retry-After" in response.headers

    async def websocket_code():
        url = f"{server.ws_url}/ws/conversations/{mine.pk}/?token={good}"
        async with ws_connect(url, proxy=None) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        return closed.value.rcvd.code

    assert async_to_sync(websocket_code)() == 4401
    cache.delete("bad-token:127.0.0.1")
    with client(server, api.owner_user) as http:
        assert http.get("/api/v1/conversations/").status_code == 200


def test_creating_conversations_is_throttled_and_pages_are_bounded(server, api):
    corpus = build_corpus(docs={})
    with client(server, api.owner_user) as http:
        codes = [
            http.post("/api/v1/conversations/", json={"corpus": corpus.slug}).status_code
            for _ in range(CONVERSATION_RATE + 1)
        ]
        assert codes == [201] * CONVERSATION_RATE + [429]
        Conversation.objects.bulk_create(
            Conversation(owner=api.owner_user, corpus=corpus, title=str(i)) for i in range(5)
        )
        page = http.get("/api/v1/conversations/", params={"limit": 1_000_000}).json()
    assert page["count"] == CONVERSATION_RATE + 5
    assert len(page["results"]) == MAX_PAGE and page["next"]


def _docx(document_xml: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as package:
        package.writestr("[Content_Types].xml", "<Types/>")
        package.writestr("word/document.xml", document_xml)
    return buffer.getvalue()


def test_a_word_file_that_unpacks_too_far_is_refused(server, api):
    services.corpus_get_or_create(slug="bomb")
    bomb = _docx(b"<w:document>" + b" " * (DOCX_LIMIT + 1) + b"</w:document>")
    assert len(bomb) < 10_000
    with client(server, api.staff_user) as http:
        files = {"file": ("bomb.docx", bomb, "application/octet-stream")}
        response = http.post("/api/v1/corpora/bomb/documents/", files=files)
    assert response.status_code == 400
    assert "unpacks to" in response.json()["file"][0]
    assert "RMASSIMO_DOCX_MAX_UNPACKED_BYTES" in response.json()["file"][0]
    assert not Document.objects.exists()


def test_every_html_page_has_a_content_security_policy(server, make_user):
    make_user("boss", staff=True, permissions=OPERATOR_PERMISSIONS)
    with client(server) as http:
        anonymous = ["/accounts/login/", "/admin/login/", "/api/docs/"]
        pages = {path: http.get(path) for path in anonymous}
        log_in(http, "boss", "pw-boss", "/admin/login/")
        for path in ("/", "/admin/", "/admin/ingestion/document/", "/admin/workers/"):
            pages[path] = http.get(path)
    for path, response in pages.items():
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html"), path
        policy = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "unsafe-inline" not in policy.split("script-src", 1)[1].split(";")[0], path


# ---- proxies ----


def test_forwarded_proto_is_believed_only_behind_a_proxy(var_dir):
    def production(behind_proxy: bool) -> Daphne:
        env = {
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
            "DJANGO_HTTPS": "true",
            "RMASSIMO_BEHIND_PROXY": "true" if behind_proxy else "false",
        }
        return Daphne(log_dir=var_dir / "logs", extra_env=env)

    with ThreadPoolExecutor(2) as pool:  # two servers start faster side by side
        direct, proxied = pool.map(production, [False, True])
    try:
        answers = {}
        for name, daphne in (("direct", direct), ("proxied", proxied)):
            with httpx.Client(base_url=daphne.url, trust_env=False, timeout=30) as http:
                answers[name] = (
                    http.get("/accounts/login/"),
                    http.get("/accounts/login/", headers={"X-Forwarded-Proto": "https"}),
                )
    finally:
        for daphne in (direct, proxied):
            daphne.proc.terminate()
        for daphne in (direct, proxied):
            daphne.stop()
    for plain, _ in answers.values():
        assert plain.status_code == 301  # plain http is always sent to https
        assert plain.headers["location"].startswith("https://")
    # Anyone can send the header: without a proxy in front it is not believed...
    assert answers["direct"][1].status_code == 301
    # ...behind one, the proxy says the client used https.
    assert answers["proxied"][1].status_code == 200


def test_admin_uploads_are_not_held_in_memory(make_user):
    """A 16 MiB upload through the admin costs the application a few MiB: Django writes
    it to disk as it arrives, and it is checked from its head and moved to storage, never
    read whole. The real ASGI application is driven in this process, the body sent in
    8 KiB messages as daphne sends it, so that Python's own accounting can tell what the
    application allocated."""
    from django.test import Client

    from rmassimo_site.asgi import application

    corpus, _ = services.corpus_get_or_create(slug="big")
    browser = Client()
    browser.force_login(make_user("boss", staff=True, permissions=OPERATOR_PERMISSIONS))
    csrf = secrets.token_hex(16)
    size = 16 * 2**20
    # A PDF by its first bytes, so it is accepted; the worker finds it unreadable at once.
    data = b"%PDF-1.4\n" + b"0" * size
    boundary = "rmassimo-boundary"
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
            for name, value in (
                ("csrfmiddlewaretoken", csrf),
                ("corpus", corpus.pk),
                ("urls", ""),
            )
        ]
        + [
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="big.pdf"\r\nContent-Type: application/pdf\r\n\r\n'.encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    cookie = f"sessionid={browser.cookies['sessionid'].value}; csrftoken={csrf}"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/admin/ingestion/document/upload/",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cookie", cookie.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }

    async def post() -> tuple[list[dict], int]:
        messages: asyncio.Queue = asyncio.Queue()
        for start in range(0, len(body), 8192):
            chunk = body[start : start + 8192]
            more = start + 8192 < len(body)
            messages.put_nowait({"type": "http.request", "body": chunk, "more_body": more})
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        tracemalloc.start()
        try:
            await application(scope, messages.get, send)
            return sent, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    sent, peak = async_to_sync(post)()
    assert sent[0]["status"] == 302, sent
    document = Document.objects.get(source="big.pdf")
    assert document.size == document.file.size == len(data)
    assert peak < size / 2, f"the upload took {peak / 2**20:.1f} MiB"
