"""The web chat in a real browser: Chromium (Playwright) against daphne and the real worker.

Screenshots go to test-artifacts/. Without Chromium these tests fail, unless
RMASSIMO_SKIP_BROWSER=1 is set.
"""

from __future__ import annotations

import re
import time

import pytest

from chat import services
from chat.models import Question
from tests.browser import ARTIFACTS, chromium, web_server  # noqa: F401  (fixtures)
from tests.corpus import build_corpus
from tests.processes import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

XSS_DOC = (
    'Notes on markup. <img src=x onerror="window.__xss=1"> then '
    "<script>window.__xss=1</script> and [x](javascript:window.__xss=1) end."
)
XSS_STRINGS = (
    '<img src=x onerror="window.__xss=1">',
    "<script>window.__xss=1</script>",
    "[x](javascript:window.__xss=1)",
)


@pytest.fixture
def open_page(chromium, web_server):  # noqa: F811
    """open_page(username, viewport=...) -> a logged-in page on the real server."""
    contexts = []

    def open_(username: str, *, viewport=None, **options):
        context = chromium.new_context(
            base_url=web_server.url,
            locale="en-US",
            viewport=viewport or {"width": 1280, "height": 900},
            **options,
        )
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto("/accounts/login/?next=/")
        page.fill("#id_username", username)
        page.fill("#id_password", f"pw-{username}")
        page.click("main.login button.primary")
        page.wait_for_url(f"{web_server.url}/")
        return page

    yield open_
    for context in contexts:
        context.close()


def words(text: str) -> str:
    return " ".join(text.split())


def shot(page, name: str, element=None) -> None:
    if element is not None:
        element.evaluate("e => e.scrollIntoView({block: 'center'})")
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def start_conversation(page, corpus_slug: str, text: str) -> int:
    page.select_option("#corpus", corpus_slug)
    page.fill("#question", text)
    page.click("#new-conversation button.primary")
    page.wait_for_url(re.compile(r"/c/\d+/$"))
    return int(re.search(r"/c/(\d+)/$", page.url).group(1))


def turn(page, index: int):
    return page.locator("#turns .turn").nth(index)


def wait_status(page, index: int, status: str, timeout: float = 30_000) -> None:
    page.wait_for_selector(
        f"#turns .turn:nth-child({index + 1})[data-status='{status}']", timeout=timeout
    )


def test_answer_streams_with_sources_in_english_and_italian(live, make_user, open_page):
    corpus = build_corpus()
    make_user("reader")
    live.configure(tps=15, reply_tokens=40)
    page = open_page("reader")
    assert page.locator("html").get_attribute("lang") == "en"
    start_conversation(page, corpus.slug, "When did Vesuvius bury Pompeii?")

    first = turn(page, 0)
    body = first.locator(".a-body")
    lengths, shot_taken = [], False
    deadline = time.monotonic() + 30
    while first.get_attribute("data-status") != "done" and time.monotonic() < deadline:
        if first.get_attribute("data-status") == "running":
            lengths.append(len(body.inner_text()))
            if not shot_taken and lengths[-1] > 20:
                shot(page, "chat-streaming-en")
                shot_taken = True
        page.wait_for_timeout(100)
    wait_status(page, 0, "done")
    growing = [n for n in lengths if n > 0]
    assert growing == sorted(growing)
    assert len(set(growing)) >= 3, f"the answer did not grow while streaming: {lengths}"
    assert shot_taken

    question = Question.objects.get()
    assert question.status == "done"
    assert words(body.inner_text()) == words(question.answer)
    sources = first.locator(".sources li")
    assert sources.count() >= 1
    assert sources.first.locator(".s-title").inner_text() == "volcanoes"
    assert "Pompeii" in sources.first.locator(".s-text").inner_text()
    assert re.fullmatch(r"score \d\.\d{3}", sources.first.locator(".s-score").inner_text())
    assert first.locator(".a-status").inner_text() == "Answered"
    shot(page, "chat-sources-en", first.locator(".a-actions"))

    first.locator(".fb-up").click()
    page.wait_for_selector("#turns .turn:nth-child(1) .fb-up[aria-pressed='true']")
    wait_for(lambda: Question.objects.get().feedback == 1, what="feedback saved")

    # Italian: the page, the sources and the strings the script writes.
    page.click(".language button[lang='it']")
    page.wait_for_selector("html[lang='it']")
    first = turn(page, 0)
    assert first.locator(".sources h3").inner_text() == "Fonti"
    assert first.locator(".a-status").inner_text() == "Risposta completata"
    assert page.locator("#ask button.primary").inner_text() == "Invia"
    assert page.locator(".conversation-head .back").get_attribute("href") == "/"
    shot(page, "chat-sources-it", first.locator(".a-actions"))

    page.fill("#question", "E che cosa seppellì il Vesuvio?")
    page.press("#question", "Enter")
    page.wait_for_selector("#turns .turn:nth-child(2)")
    page.wait_for_function(
        "() => { const t = document.querySelector('#turns .turn:nth-child(2)');"
        " return t.dataset.status === 'running'"
        " && t.querySelector('.a-body').textContent.length > 20; }"
    )
    assert turn(page, 1).locator(".a-status").inner_text().startswith("Sto rispondendo")
    shot(page, "chat-streaming-it", turn(page, 1))
    wait_status(page, 1, "done")
    assert turn(page, 1).locator(".sources h3").inner_text() == "Fonti"
    shot(page, "chat-answer-it", turn(page, 1).locator(".a-actions"))

    # Retry asks the same question again in the same conversation.
    live.configure(tps=0)
    turn(page, 0).locator(".retry").click()
    page.wait_for_selector("#turns .turn:nth-child(3)")
    wait_status(page, 2, "done")
    assert turn(page, 2).locator(".q-text").inner_text() == "When did Vesuvius bury Pompeii?"
    texts = list(Question.objects.order_by("id").values_list("text", "conversation"))
    assert texts[2] == texts[0]


def test_stop_button_cancels_the_answer(live, make_user, open_page):
    corpus = build_corpus()
    make_user("reader")
    live.configure(tps=10, reply_tokens=400)
    page = open_page("reader")
    start_conversation(page, corpus.slug, "Tell me everything about sourdough")
    page.wait_for_function(
        "() => document.querySelector('#turns .turn .a-body').textContent.length > 10"
    )
    first = turn(page, 0)
    assert first.locator(".stop").is_visible()
    first.locator(".stop").click()
    wait_status(page, 0, "cancelled")
    assert first.locator(".a-status").inner_text() == "Stopped"
    assert not first.locator(".stop").is_visible()
    assert first.locator(".retry").is_visible()
    assert first.locator(".a-body").inner_text().startswith("Echo:")
    assert Question.objects.get().status == "cancelled"


def test_reload_mid_answer_resumes_without_gaps(live, make_user, open_page):
    corpus = build_corpus()
    make_user("reader")
    live.configure(tps=15, reply_tokens=60)
    page = open_page("reader")
    start_conversation(page, corpus.slug, "Who favours the Najdorf variation?")
    page.wait_for_function(
        "() => document.querySelector('#turns .turn .a-body').textContent.length > 30"
    )
    page.reload()
    assert turn(page, 0).get_attribute("data-status") == "running"
    wait_status(page, 0, "done")
    question = Question.objects.get()
    assert words(turn(page, 0).locator(".a-body").inner_text()) == words(question.answer)


def test_markup_in_documents_and_answers_stays_text(live, make_user, open_page):
    corpus = build_corpus(slug="markup", docs={"payload.txt": XSS_DOC})
    make_user("reader")
    live.configure(reply_tokens=120)
    page = open_page("reader")
    start_conversation(page, corpus.slug, '<img src=x onerror="window.__xss=1"> markup?')
    wait_status(page, 0, "done")

    def check(page) -> None:
        assert page.evaluate("() => typeof window.__xss") == "undefined"
        turns = page.locator("#turns")
        assert turns.locator("img, script, iframe, object").count() == 0
        assert turns.locator("a[href^='javascript'], a[href^='JAVASCRIPT']").count() == 0
        answer = turn(page, 0).locator(".a-body").inner_text()
        sources = turn(page, 0).locator(".sources").inner_text()
        for text in XSS_STRINGS:
            assert text in answer
            assert text in sources
        assert turn(page, 0).locator(".q-text").inner_text().startswith("<img src=x")

    check(page)
    shot(page, "chat-markup-as-text")
    page.reload()  # the server-rendered page, then the script's markdown pass
    page.wait_for_selector("#turns .turn .a-body p")
    check(page)


def test_phone_screen(live, make_user, open_page):
    corpus = build_corpus(docs={})
    owner = make_user("reader")
    conversation = services.conversation_create(owner=owner, corpus=corpus, title="Vesuvius")
    Question.objects.create(
        conversation=conversation,
        text="When did Vesuvius bury Pompeii?",
        status=Question.Status.DONE,
        gpu="gpu0",
        answer="**In 79 AD.** It buried:\n\n- Pompeii\n- Herculaneum\n\nSee [a map](https://example.org/map).",
        sources=[
            {
                "document": 1,
                "title": "volcanoes",
                "page": 3,
                "score": 0.91,
                "text": "Its eruption in 79 AD buried Pompeii and Herculaneum under ash.",
            }
        ],
    )
    page = open_page(
        "reader", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    shot(page, "chat-phone-home")
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    page.goto(f"/c/{conversation.pk}/")
    page.wait_for_selector("#turns .turn .a-body strong")
    assert page.locator(".sidebar").is_hidden()
    assert page.locator(".conversation-head .back").is_visible()
    assert page.locator("#question").is_visible()
    body = turn(page, 0).locator(".a-body")
    assert body.locator("li").count() == 2
    assert body.locator("a").get_attribute("href") == "https://example.org/map"
    assert "p. 3" in turn(page, 0).locator(".s-page").inner_text()
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "chat-phone")
