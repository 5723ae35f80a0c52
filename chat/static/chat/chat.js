/* The web chat: asks through the HTTP API (session + CSRF), follows answers over the
 * conversation's websocket, and renders model text only through RMMarkdown / textContent.
 */
(function () {
  "use strict";

  var S = JSON.parse(document.getElementById("rm-strings").textContent);
  var CSRF = document.querySelector('meta[name="csrf-token"]').content;
  var FINAL = { done: true, failed: true, cancelled: true };
  var STOP_CODES = { 4401: true, 4403: true, 4404: true };

  function fmt(template, values) {
    return template.replace(/%\((\w+)\)s/g, function (_, key) {
      return values[key] === undefined || values[key] === null ? "" : String(values[key]);
    });
  }

  function api(method, url, body) {
    return fetch(url, {
      method: method,
      credentials: "same-origin",
      headers: {
        Accept: "application/json",
        "Content-Type": "application/json",
        "X-CSRFToken": CSRF,
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then(function (response) {
      return response
        .json()
        .catch(function () {
          return {};
        })
        .then(function (data) {
          if (!response.ok) {
            var error = new Error(errorText(data) || response.status + " " + response.statusText);
            error.status = response.status;
            throw error;
          }
          return data;
        });
    });
  }

  function errorText(data) {
    if (!data || typeof data !== "object") return "";
    if (typeof data.detail === "string") return data.detail;
    var parts = [];
    Object.keys(data).forEach(function (key) {
      var value = data[key];
      parts.push(Array.isArray(value) ? value.join(" ") : String(value));
    });
    return parts.join(" ");
  }

  function showError(form, text) {
    var box = form.querySelector(".form-error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function submitOnEnter(textarea, form) {
    textarea.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
  }

  /* ---- home: a new conversation starts with its first question ---- */

  function initHome() {
    var form = document.getElementById("new-conversation");
    if (!form) return;
    var textarea = form.querySelector("textarea");
    submitOnEnter(textarea, form);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var text = textarea.value.trim();
      var corpus = form.querySelector("select").value;
      if (!text) return showError(form, S.emptyQuestion);
      if (!corpus) return showError(form, S.noCorpus);
      var button = form.querySelector("button[type=submit]");
      button.disabled = true;
      api("POST", "/api/v1/questions/", { text: text, corpus: corpus })
        .then(function (question) {
          window.location.assign("/c/" + question.conversation + "/");
        })
        .catch(function (error) {
          button.disabled = false;
          showError(form, fmt(S.sendFailed, { error: error.message }));
        });
    });
  }

  /* ---- conversation: turns, live events ---- */

  var turnsBox, template, connectionLabel, conversationId;
  var turns = {}; // question id -> state

  function Turn(el) {
    this.el = el;
    this.id = parseInt(el.dataset.question, 10);
    this.body = el.querySelector(".a-body");
    this.parts = null; // delta texts by seq while streaming
    this.attempt = 0; // the attempt whose text is shown
    this.text = this.body.textContent;
    this.renderPending = false;
  }

  Turn.prototype.status = function () {
    return this.el.dataset.status;
  };

  Turn.prototype.setStatus = function (status, label) {
    this.el.dataset.status = status;
    this.el.querySelector(".a-status").textContent = label;
  };

  Turn.prototype.setText = function (text) {
    this.text = text;
    this.scheduleRender();
  };

  Turn.prototype.scheduleRender = function () {
    if (this.renderPending) return;
    this.renderPending = true;
    var self = this;
    window.requestAnimationFrame(function () {
      self.renderPending = false;
      var root = document.scrollingElement || document.documentElement;
      var following = root.scrollHeight - root.scrollTop - window.innerHeight < 120;
      self.render();
      // Keep a growing answer in view, unless the reader has scrolled up to read.
      if (following) window.scrollTo(0, root.scrollHeight);
    });
  };

  Turn.prototype.render = function () {
    window.RMMarkdown.render(this.text, this.body);
    this.linkCitations();
  };

  // "[n]" in the answer becomes a link to passage n of its sources (document, page, text).
  var CITATION = /\[(\d{1,3}(?:\s*[,;]\s*\d{1,3})*)\]/g;

  Turn.prototype.linkCitations = function () {
    var passages = {};
    this.el.querySelectorAll(".sources .source[data-n]").forEach(function (li) {
      passages[li.dataset.n] = li;
    });
    if (!Object.keys(passages).length) return;
    var walker = document.createTreeWalker(this.body, NodeFilter.SHOW_TEXT);
    var nodes = [];
    while (walker.nextNode()) {
      if (!walker.currentNode.parentElement.closest("a, code, pre")) nodes.push(walker.currentNode);
    }
    nodes.forEach(function (node) {
      var text = node.nodeValue;
      CITATION.lastIndex = 0;
      if (!CITATION.test(text)) return;
      var fragment = document.createDocumentFragment();
      var last = 0;
      text.replace(CITATION, function (match, numbers, offset) {
        fragment.appendChild(document.createTextNode(text.slice(last, offset)));
        numbers.split(/\s*[,;]\s*/).forEach(function (n) {
          var li = passages[String(parseInt(n, 10))];
          if (!li) {
            fragment.appendChild(document.createTextNode("[" + n + "]"));
            return;
          }
          var link = document.createElement("a");
          link.className = "cite";
          link.href = "#" + li.id;
          link.textContent = "[" + parseInt(n, 10) + "]";
          link.title = li.querySelector(".s-head").textContent.replace(/\s+/g, " ").trim();
          fragment.appendChild(link);
        });
        last = offset + match.length;
        return match;
      });
      fragment.appendChild(document.createTextNode(text.slice(last)));
      node.parentNode.replaceChild(fragment, node);
    });
  };

  Turn.prototype.setSources = function (sources) {
    var section = this.el.querySelector(".sources");
    var list = section.querySelector("ol");
    var id = this.id;
    list.replaceChildren();
    var numbered = (sources || []).map(function (source, i) {
      return { source: source, n: i + 1 };
    });
    // Cited passages first; each keeps its number, the one the answer's markers use.
    numbered.sort(function (a, b) {
      return (b.source.cited ? 1 : 0) - (a.source.cited ? 1 : 0) || a.n - b.n;
    });
    numbered.forEach(function (entry) {
      var source = entry.source;
      var li = document.createElement("li");
      li.className = source.cited ? "source cited" : "source";
      li.id = "q" + id + "-p" + entry.n;
      li.dataset.n = String(entry.n);
      var head = document.createElement("div");
      head.className = "s-head";
      head.appendChild(span("s-n", "[" + entry.n + "]"));
      head.appendChild(document.createTextNode(" "));
      head.appendChild(span("s-title", source.title));
      if (source.page !== null && source.page !== undefined) {
        head.appendChild(document.createTextNode(" "));
        head.appendChild(span("s-page", fmt(S.page, { page: source.page })));
      }
      head.appendChild(document.createTextNode(" "));
      var score = typeof source.score === "number" ? source.score.toFixed(3) : source.score;
      head.appendChild(span("s-score", fmt(S.score, { score: score })));
      li.appendChild(head);
      var quote = document.createElement("blockquote");
      quote.className = "s-text";
      var text = String(source.text || "");
      quote.textContent = text.length > 400 ? text.slice(0, 399) + "…" : text;
      li.appendChild(quote);
      list.appendChild(li);
    });
    section.hidden = !(sources && sources.length);
  };

  Turn.prototype.setMeta = function (timings, gpu) {
    var meta = this.el.querySelector(".a-meta");
    if (!timings || timings.total_ms === null || timings.total_ms === undefined) {
      meta.textContent = "";
      return;
    }
    var text = fmt(S.timings, { seconds: (timings.total_ms / 1000).toFixed(1), gpu: gpu || "" });
    if (timings.tokens_per_s) text += " · " + fmt(S.tokensPerSecond, { rate: timings.tokens_per_s });
    meta.textContent = text;
  };

  Turn.prototype.setFeedback = function (value) {
    this.el.dataset.feedback = value === null || value === undefined ? "" : String(value);
    this.el.querySelectorAll(".fb").forEach(function (button) {
      button.setAttribute("aria-pressed", String(button.dataset.value === String(value)));
    });
  };

  Turn.prototype.applyQuestion = function (question) {
    // A final state read from the API (the DB is the truth once an answer ends).
    if (!FINAL[question.status]) return;
    this.parts = null;
    this.setText(question.answer || "");
    this.setSources(question.sources);
    this.setMeta(question.timings, question.gpu);
    this.el.querySelector(".a-error").textContent = question.error || "";
    // An answer stopped by a length or repetition limit says so: it is not a whole answer.
    var label = question.status === "done" && question.truncated ? S.truncated : S[question.status];
    this.setStatus(question.status, label);
  };

  function span(className, text) {
    var el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  function turnFor(id, text) {
    if (turns[id]) {
      if (text !== undefined) turns[id].el.querySelector(".q-text").textContent = text;
      return turns[id];
    }
    var el = template.content.firstElementChild.cloneNode(true);
    el.dataset.question = String(id);
    el.dataset.status = "queued";
    el.querySelector(".q-text").textContent = text || "";
    el.querySelector(".a-status").textContent = S.queued;
    turnsBox.appendChild(el);
    var turn = new Turn(el);
    turns[id] = turn;
    if (text === undefined) {
      // An event for a question asked elsewhere (another tab, the API): fetch its text.
      api("GET", "/api/v1/questions/" + id + "/").then(function (question) {
        el.querySelector(".q-text").textContent = question.text;
        turn.applyQuestion(question);
      });
    }
    el.scrollIntoView({ block: "end", behavior: "smooth" });
    return turn;
  }

  function onEvent(event) {
    var id = event.question;
    if (typeof id !== "number") return;
    var turn = turnFor(id);
    switch (event.type) {
      case "queued":
        if (event.retry && turn.status() === "running") {
          // The answer is being tried again (on another GPU, when there is one).
          turn.parts = null;
          turn.setText("");
          turn.setStatus("queued", S.queued);
        } else if (turn.status() === "queued") {
          turn.setStatus("queued", event.position ? fmt(S.queuedAt, event) : S.queued);
        }
        break;
      case "started":
        if (event.attempt && turn.attempt && event.attempt < turn.attempt) break;
        turn.attempt = event.attempt || turn.attempt;
        turn.parts = [];
        turn.setText("");
        turn.setStatus("running", event.gpu ? fmt(S.runningOn, event) : S.running);
        break;
      case "delta":
        if (FINAL[turn.status()]) break;
        // An attempt that lost its claim may stream a little longer: not its text.
        if (event.attempt && turn.attempt && event.attempt < turn.attempt) break;
        if (!turn.parts) turn.parts = [];
        turn.parts[event.seq] = event.text; // by seq: a repeated delta changes nothing
        if (turn.status() !== "running") turn.setStatus("running", S.running);
        turn.setText(turn.parts.join(""));
        break;
      case "done":
        turn.applyQuestion({
          status: "done",
          answer: event.answer,
          truncated: event.truncated,
          sources: event.sources,
          timings: event.timings,
          gpu: event.gpu,
        });
        break;
      case "failed":
        turn.applyQuestion({ status: "failed", answer: turn.text, error: event.error });
        break;
      case "cancelled":
        turn.parts = null;
        turn.setStatus("cancelled", S.cancelled);
        break;
    }
  }

  function refreshUnfinished() {
    // Anything that ended while we were not connected is read from the API.
    Object.keys(turns).forEach(function (id) {
      var turn = turns[id];
      if (FINAL[turn.status()]) return;
      api("GET", "/api/v1/questions/" + id + "/")
        .then(function (question) {
          turn.applyQuestion(question);
        })
        .catch(function () {});
    });
  }

  var socket = null;
  var retries = 0;

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var path = document.getElementById("conversation").dataset.wsPath;
    socket = new WebSocket(scheme + window.location.host + path);
    socket.addEventListener("open", function () {
      retries = 0;
      connectionLabel.textContent = "· " + S.connected;
      document.body.dataset.live = "true";
      refreshUnfinished();
    });
    socket.addEventListener("message", function (message) {
      var event;
      try {
        event = JSON.parse(message.data);
      } catch (e) {
        return;
      }
      onEvent(event);
    });
    socket.addEventListener("close", function (event) {
      document.body.dataset.live = "false";
      if (STOP_CODES[event.code]) {
        connectionLabel.textContent = "· " + S.forbidden;
        return;
      }
      connectionLabel.textContent = "· " + S.connecting;
      var delay = Math.min(10000, 300 * Math.pow(2, retries++));
      window.setTimeout(connect, delay);
    });
  }

  function ask(text) {
    return api("POST", "/api/v1/questions/", { text: text, conversation: conversationId }).then(
      function (question) {
        var turn = turnFor(question.id, question.text);
        if (question.status === "queued" && turn.status() === "queued") {
          turn.setStatus("queued", S.queued);
        }
        return question;
      }
    );
  }

  function onTurnClick(event) {
    var button = event.target.closest("button");
    if (!button) return;
    var el = button.closest(".turn");
    var turn = el && turns[el.dataset.question];
    if (!turn) return;
    var failed = function (error) {
      turn.el.querySelector(".a-error").textContent = fmt(S.actionFailed, { error: error.message });
    };
    if (button.classList.contains("stop")) {
      button.disabled = true;
      api("POST", "/api/v1/questions/" + turn.id + "/cancel/")
        .then(function (question) {
          if (question.status === "cancelled") {
            turn.parts = null;
            turn.setStatus("cancelled", S.cancelled);
          } else {
            turn.applyQuestion(question);
          }
        })
        .catch(failed)
        .finally(function () {
          button.disabled = false;
        });
    } else if (button.classList.contains("retry")) {
      button.disabled = true;
      ask(turn.el.querySelector(".q-text").textContent)
        .catch(failed)
        .finally(function () {
          button.disabled = false;
        });
    } else if (button.classList.contains("fb")) {
      var value = parseInt(button.dataset.value, 10);
      var next = turn.el.dataset.feedback === String(value) ? null : value;
      api("POST", "/api/v1/questions/" + turn.id + "/feedback/", { value: next })
        .then(function (question) {
          turn.setFeedback(question.feedback);
        })
        .catch(failed);
    }
  }

  function initConversation() {
    var main = document.getElementById("conversation");
    if (!main) return;
    conversationId = parseInt(main.dataset.conversation, 10);
    turnsBox = document.getElementById("turns");
    template = document.getElementById("turn-template");
    connectionLabel = main.querySelector(".connection");
    turnsBox.querySelectorAll(".turn").forEach(function (el) {
      var turn = new Turn(el);
      turns[turn.id] = turn;
      turn.render();
    });
    turnsBox.addEventListener("click", onTurnClick);

    var form = document.getElementById("ask");
    var textarea = form.querySelector("textarea");
    submitOnEnter(textarea, form);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var text = textarea.value.trim();
      if (!text) return showError(form, S.emptyQuestion);
      var button = form.querySelector("button[type=submit]");
      button.disabled = true;
      showError(form, "");
      ask(text)
        .then(function () {
          textarea.value = "";
        })
        .catch(function (error) {
          showError(form, fmt(S.sendFailed, { error: error.message }));
        })
        .finally(function () {
          button.disabled = false;
          textarea.focus();
        });
    });
    var last = turnsBox.lastElementChild;
    if (last) last.scrollIntoView({ block: "end" });
    connect();
  }

  initHome();
  initConversation();
})();
