/* A small, safe Markdown renderer for model answers.
 *
 * It builds DOM nodes and writes text only through textContent / createTextNode: model
 * output and document text never reach innerHTML, so "<script>" or "<img onerror>" in an
 * answer shows as those characters. Links are kept only for http and https URLs; any other
 * link (javascript:, data:, relative) stays as its source text.
 *
 * Supported: paragraphs, line breaks, # headings, - and 1. lists, > quotes, ``` code
 * blocks, `code`, **bold**, *italic* / _italic_, [text](http://...) and bare http(s) URLs.
 */
(function (global) {
  "use strict";

  var INLINE = new RegExp(
    [
      "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)", // 1,2: code span
      "\\[([^\\]\\n]+)\\]\\(([^()\\s]+)\\)", // 3,4: link
      "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 5: bold
      "(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])", // 6: bold
      "\\*(?=[^\\s*])([^*]*?[^\\s*])\\*", // 7: italic
      "(?<![\\w])_(?=[^\\s_])([^_]*?[^\\s_])_(?![\\w])", // 8: italic
      "(https?:\\/\\/[^\\s<>()\\[\\]]*[^\\s<>()\\[\\].,;:!?'\"])", // 9: bare URL
    ].join("|"),
    "g"
  );

  function safeUrl(url) {
    if (!/^https?:\/\//i.test(url)) return null;
    try {
      var parsed = new URL(url);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (e) {
      return null;
    }
  }

  function link(href, text) {
    var a = document.createElement("a");
    a.href = href;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    a.textContent = text;
    return a;
  }

  function inline(text, parent, depth) {
    depth = depth || 0;
    var last = 0;
    var m;
    INLINE.lastIndex = 0;
    var matches = [];
    while ((m = INLINE.exec(text)) !== null) {
      matches.push({ m: m, index: m.index, end: INLINE.lastIndex });
      if (m[0].length === 0) INLINE.lastIndex++;
    }
    matches.forEach(function (item) {
      var m = item.m;
      if (item.index > last) parent.appendChild(document.createTextNode(text.slice(last, item.index)));
      last = item.end;
      var el;
      if (m[2] !== undefined) {
        el = document.createElement("code");
        el.textContent = m[2];
      } else if (m[3] !== undefined) {
        var href = safeUrl(m[4]);
        el = href ? link(href, m[3]) : document.createTextNode(m[0]);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        el = document.createElement("strong");
        nested(m[5] !== undefined ? m[5] : m[6], el, depth);
      } else if (m[7] !== undefined || m[8] !== undefined) {
        el = document.createElement("em");
        nested(m[7] !== undefined ? m[7] : m[8], el, depth);
      } else if (m[9] !== undefined) {
        var url = safeUrl(m[9]);
        el = url ? link(url, m[9]) : document.createTextNode(m[9]);
      } else {
        el = document.createTextNode(m[0]);
      }
      parent.appendChild(el);
    });
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function nested(text, parent, depth) {
    if (depth > 4) parent.appendChild(document.createTextNode(text));
    else inline(text, parent, depth + 1);
  }

  function inlineLines(lines, parent) {
    lines.forEach(function (line, i) {
      if (i > 0) parent.appendChild(document.createElement("br"));
      inline(line, parent);
    });
  }

  var FENCE = /^\s*```/;
  var HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  var BULLET = /^\s*[-*+]\s+(.*)$/;
  var NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
  var QUOTE = /^\s*>\s?(.*)$/;
  var RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

  function blocks(lines, parent, depth) {
    var i = 0;
    var para = [];
    function flush() {
      if (para.length) {
        var p = document.createElement("p");
        inlineLines(para, p);
        parent.appendChild(p);
        para = [];
      }
    }
    while (i < lines.length) {
      var line = lines[i];
      var m;
      if (FENCE.test(line)) {
        flush();
        var code = [];
        i++;
        while (i < lines.length && !FENCE.test(lines[i])) code.push(lines[i++]);
        i++; // the closing fence, if any: a block still streaming is shown as it grows
        var pre = document.createElement("pre");
        var c = document.createElement("code");
        c.textContent = code.join("\n");
        pre.appendChild(c);
        parent.appendChild(pre);
        continue;
      }
      if (!line.trim()) {
        flush();
        i++;
        continue;
      }
      if ((m = HEADING.exec(line))) {
        flush();
        var h = document.createElement("h" + Math.min(6, m[1].length + 2));
        inline(m[2], h);
        parent.appendChild(h);
        i++;
        continue;
      }
      if (RULE.test(line) && !para.length) {
        parent.appendChild(document.createElement("hr"));
        i++;
        continue;
      }
      if (QUOTE.test(line) && depth < 3) {
        flush();
        var quoted = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
          quoted.push(m[1]);
          i++;
        }
        var bq = document.createElement("blockquote");
        blocks(quoted, bq, depth + 1);
        parent.appendChild(bq);
        continue;
      }
      var numbered = NUMBERED.exec(line);
      if (BULLET.test(line) || numbered) {
        flush();
        var pattern = numbered ? NUMBERED : BULLET;
        var list = document.createElement(numbered ? "ol" : "ul");
        if (numbered && numbered[1] !== "1") list.start = parseInt(numbered[1], 10);
        var item = null;
        while (i < lines.length) {
          var lm = pattern.exec(lines[i]);
          if (lm) {
            item = document.createElement("li");
            inline(numbered ? lm[2] : lm[1], item);
            list.appendChild(item);
          } else if (item && lines[i].trim() && /^\s{2,}/.test(lines[i])) {
            item.appendChild(document.createElement("br"));
            inline(lines[i].trim(), item);
          } else {
            break;
          }
          i++;
        }
        parent.appendChild(list);
        continue;
      }
      para.push(line);
      i++;
    }
    flush();
  }

  /** Replace the children of `container` with `text` rendered as Markdown. */
  function render(text, container) {
    var fragment = document.createDocumentFragment();
    blocks(String(text || "").replace(/\r\n?/g, "\n").split("\n"), fragment, 0);
    container.replaceChildren(fragment);
  }

  global.RMMarkdown = { render: render, safeUrl: safeUrl };
})(window);
