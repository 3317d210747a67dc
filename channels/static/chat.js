// The web chat page: one conversation per browser tab, talking to the bot over ./ws.
// Everything the server or the user wrote is shown with textContent, never as HTML.
"use strict";
(() => {
  const PREFIX = "flowbot.";
  const load = (key, fallback) => {
    try {
      const raw = sessionStorage.getItem(PREFIX + key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  };
  const save = (key, value) => {
    try {
      sessionStorage.setItem(PREFIX + key, JSON.stringify(value));
    } catch {
      // storage full or blocked: the chat still works, only a reload forgets more
    }
  };
  // getRandomValues works on plain-http LAN addresses too (randomUUID needs a secure context).
  const randomHex = (bytes) =>
    Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");

  // sessionStorage is per tab: a reload keeps the conversation, another tab starts its own.
  let session = load("session", "");
  if (typeof session !== "string" || !/^[A-Za-z0-9_-]{16,64}$/.test(session)) {
    session = randomHex(16);
    save("session", session);
  }
  const mine = load("mine", []); // the user's messages: {id, after, frame, acked}
  const used = load("used", {}); // bot message id -> payload of the button pressed under it
  const ended = load("ended", {}); // executionId -> outcome of a WebView wait that ended

  const $ = (id) => document.getElementById(id);
  const log = $("log");
  const scroller = $("scroller");
  const hint = $("hint");
  const status = $("status");
  const input = $("text");

  let lastId = 0; // newest bot message on this page; a reload starts from 0 (the newest 200)
  let shownMine = 0; // how many of `mine` are on the page
  const sending = new Map(); // client id -> bubble not yet acknowledged by the server
  let ws = null;
  let attempt = 0;
  let retryTimer = null;
  let live = false; // the first replay is done: new bubbles may animate

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function append(node) {
    if (live && node.classList.contains("msg")) node.classList.add("fresh");
    hint.hidden = true;
    log.append(node);
    scroller.scrollTop = scroller.scrollHeight;
  }

  function setStatus(kind, text) {
    status.className = "status " + kind;
    status.textContent = text;
  }

  function notice(text) {
    append(el("li", "system", text));
  }

  // The user's bubbles are not stored by the server; each remembers the newest bot message
  // it followed (`after`), so a reload puts it back in its place among the replayed ones.
  function showMine(beforeId) {
    while (shownMine < mine.length && mine[shownMine].after < beforeId) {
      const m = mine[shownMine++];
      const li = el("li", "msg me");
      li.append(el("div", "bubble", m.frame.type === "button" ? m.frame.label : m.frame.text));
      if (m.refused) li.classList.add("refused");
      if (!m.acked) {
        li.classList.add("sending");
        li.append(el("div", "note"));
        sending.set(m.id, li);
        markUnsent(li, !(ws && ws.readyState === WebSocket.OPEN));
      }
      append(li);
    }
  }

  // A reloaded page gets only the newest messages back: the user's bubbles from before the
  // newest message left out (`last`) stay off the page too, so nothing shows out of place.
  function skipEarlier(last) {
    if (typeof last !== "number" || lastId > 0) return;
    while (shownMine < mine.length && mine[shownMine].after < last) shownMine++;
    append(el("li", "system", "Earlier messages are not shown."));
  }

  // Text that looks like a command or code — a ``` fenced block, lines indented by 4
  // spaces or a tab, or a line starting with `curl` — is shown monospace, unwrapped
  // (scrolling sideways) and with a Copy button; the rest stays plain text.
  const COMMAND = /^\s*(curl|wget|\$) /;
  const INDENTED = /^( {4}|\t)/;

  function segments(text) {
    const out = []; // {code: bool, text}
    const lines = text.split("\n");
    let plain = [];
    const flush = () => {
      if (plain.length) out.push({ code: false, text: plain.join("\n") });
      plain = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      if (/^\s*```/.test(line)) {
        const end = lines.findIndex((l, j) => j > i && /^\s*```\s*$/.test(l));
        if (end > i) {
          flush();
          out.push({ code: true, text: lines.slice(i + 1, end).join("\n") });
          i = end;
          continue;
        }
      }
      if ((INDENTED.test(line) && line.trim()) || COMMAND.test(line)) {
        flush();
        const block = [];
        // a command goes on while its lines end with a backslash; indented code while indented
        while (i < lines.length && (INDENTED.test(lines[i]) || COMMAND.test(lines[i])
                                    || (block.length && /\\$/.test(block[block.length - 1])))) {
          block.push(lines[i].replace(INDENTED, ""));
          i++;
        }
        i--;
        out.push({ code: true, text: block.join("\n") });
        continue;
      }
      plain.push(line);
    }
    flush();
    return out;
  }

  function copyButton(text) {
    const btn = el("button", "copy", "Copy");
    btn.type = "button";
    btn.title = "Copy to the clipboard";
    btn.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(text);
        btn.textContent = "Copied";
      } catch {
        // no clipboard (plain http on another host): select it for Ctrl-C instead
        const range = document.createRange();
        range.selectNodeContents(btn.previousElementSibling);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        btn.textContent = "Selected";
      }
      setTimeout(() => { btn.textContent = "Copy"; }, 2000);
    });
    return btn;
  }

  function bubble(text) {
    const div = el("div", "bubble");
    const parts = segments(text);
    if (!parts.some((part) => part.code)) {
      div.textContent = text;
      return div;
    }
    div.classList.add("has-code");
    for (const part of parts) {
      if (!part.code) {
        const trimmed = part.text.replace(/^\n+|\n+$/g, "");
        if (trimmed) div.append(el("p", "plain", trimmed));
        continue;
      }
      const box = el("div", "code");
      const pre = el("pre");
      pre.append(el("code", null, part.text));
      pre.tabIndex = 0; // scrollable by keyboard
      box.append(pre, copyButton(part.text));
      div.append(box);
    }
    return div;
  }

  function webAddress(url) {
    try {
      const u = new URL(url, location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch {
      return null;
    }
  }

  // the last path segment, %-decoded; as written when that is not valid %-encoding (a
  // URL a flow sends may hold a lone "%": decodeURIComponent would throw, and the whole
  // message would not be shown)
  function fileName(href) {
    const name = href.split(/[?#]/)[0].split("/").pop();
    try {
      return decodeURIComponent(name);
    } catch {
      return name;
    }
  }

  function showBot(doc) {
    if (typeof doc.id !== "number" || doc.id <= lastId) return; // shown already
    showMine(doc.id);
    lastId = doc.id;
    const li = el("li", "msg bot");
    li.dataset.id = String(doc.id);
    if (doc.media && webAddress(doc.media.url)) {
      // a flow's image is shown; a document is a link to open
      const href = webAddress(doc.media.url);
      if (doc.media.kind === "image") {
        const img = document.createElement("img");
        img.className = "media";
        img.src = href;
        img.alt = doc.text || "image";
        li.append(img);
      } else {
        const a = el("a", "media", fileName(href) || href);
        a.href = href;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        li.append(a);
      }
    }
    if (doc.text || !doc.media) li.append(bubble(doc.text));
    if (Array.isArray(doc.buttons) && doc.buttons.length) {
      const row = el("div", "choices");
      for (const b of doc.buttons) {
        const btn = el("button", "choice", b.label);
        btn.type = "button";
        btn.dataset.payload = b.payload;
        btn.addEventListener("click", () => press(doc.id, b, row));
        row.append(btn);
      }
      if (used[doc.id] !== undefined) markUsed(row, used[doc.id]);
      li.append(row);
    }
    if (doc.link) {
      const row = el("div", "choices");
      const a = el("a", "open", doc.link.label);
      const href = webAddress(doc.link.url);
      if (href) {
        a.href = href;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        const eid = new URL(href).searchParams.get("executionId");
        if (eid) {
          a.dataset.execution = eid;
          if (ended[eid]) closeLink(a, ended[eid]);
        }
      } else {
        a.classList.add("broken");
        a.title = "This button does not point to a web page.";
      }
      row.append(a);
      li.append(row);
    }
    append(li);
  }

  // The server says when a WebView's wait ended (and how); its button then goes inactive,
  // here and after a reload of this tab.
  const OUTCOME = {
    success: "done", error: "failed", expired: "expired", cancelled: "cancelled", gone: "closed",
    removed: "closed",
  };

  function closeLink(a, outcome) {
    if (a.classList.contains("closed")) return;
    const said = OUTCOME[outcome] || outcome;
    a.classList.add("closed");
    a.removeAttribute("href");
    a.setAttribute("aria-disabled", "true");
    a.title = `This page is no longer waiting (${said}).`;
    a.append(el("span", "outcome", ` · ${said}`));
  }

  function waitEnded(doc) {
    if (typeof doc.executionId !== "string" || typeof doc.outcome !== "string") return;
    ended[doc.executionId] = doc.outcome;
    save("ended", ended);
    for (const a of log.querySelectorAll("a.open[data-execution]")) {
      if (a.dataset.execution === doc.executionId) closeLink(a, doc.outcome);
    }
  }

  // A WebView wait may end while this page is offline (or before a reload): once the
  // replay is in, the page asks about the links it still shows open, and the server
  // answers with a wait_ended frame for each that ended (most recent links, up to 200).
  function askAboutOpenLinks(sock) {
    const ids = new Set();
    for (const a of log.querySelectorAll("a.open[data-execution]:not(.closed)")) ids.add(a.dataset.execution);
    if (!ids.size) return;
    sock.send(JSON.stringify({ type: "waits", id: randomHex(8), executionIds: [...ids].slice(-200) }));
  }

  // A button row the user answered by typing instead of pressing goes inactive like a
  // pressed one, with no choice highlighted (a wrong answer brings a new row anyway).
  const TYPED = "\u0000typed";

  function markTyped() {
    for (const li of log.querySelectorAll(".msg.bot[data-id]")) {
      const row = li.querySelector(".choices:not(.used)");
      if (row && row.querySelector("button.choice")) {
        used[li.dataset.id] = TYPED;
        markUsed(row, TYPED);
      }
    }
    save("used", used);
  }

  function markUsed(row, payload) {
    row.classList.add("used");
    for (const btn of row.querySelectorAll("button")) {
      btn.disabled = true;
      if (btn.dataset.payload === payload) btn.classList.add("chosen");
    }
  }

  function press(messageId, button, row) {
    if (row.classList.contains("used")) return;
    used[messageId] = button.payload;
    save("used", used);
    markUsed(row, button.payload);
    submit({ type: "button", payload: button.payload, label: button.label });
  }

  // A message is kept until the server acknowledges it and re-sent after a reconnect;
  // its id makes the server handle it once however often it arrives.
  function submit(frame) {
    frame.id = randomHex(8);
    // a lone UTF-16 surrogate (pasted from broken text) is not Unicode: the server refuses it
    for (const key of ["text", "label"]) {
      if (typeof frame[key] === "string" && frame[key].toWellFormed) frame[key] = frame[key].toWellFormed();
    }
    mine.push({ id: frame.id, after: lastId, frame, acked: false });
    save("mine", mine);
    showMine(Infinity);
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
  }

  // A message not yet acknowledged says so: "sending…" while connected, "not sent — will
  // retry" while offline (it is re-sent by itself on reconnect, and handled once).
  function markUnsent(li, offline) {
    li.classList.toggle("unsent", offline);
    const note = li.querySelector(".note");
    if (note) note.textContent = offline ? "not sent — will retry" : "sending…";
  }

  function markAllUnsent(offline) {
    for (const li of sending.values()) markUnsent(li, offline);
  }

  function acknowledged(id) {
    for (let i = mine.length - 1; i >= 0; i--) {
      if (mine[i].id === id) {
        mine[i].acked = true;
        save("mine", mine);
        break;
      }
    }
    const li = sending.get(id);
    if (li) {
      li.classList.remove("sending", "unsent");
      li.querySelector(".note")?.remove();
      sending.delete(id);
    }
  }

  // The server refused one of our frames: never send it again (it would be refused again,
  // on every reconnect). With `retry` it could not store it just now: send it once more later.
  function refused(doc) {
    const m = typeof doc.id === "string" ? mine.find((x) => x.id === doc.id) : undefined;
    if (m && doc.retry) {
      setTimeout(() => {
        if (!m.acked && ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(m.frame));
      }, 5000);
      return;
    }
    if (m) {
      m.acked = true;
      m.refused = true;
      save("mine", mine);
      const li = sending.get(m.id);
      if (li) {
        li.classList.remove("sending", "unsent");
        li.querySelector(".note")?.remove();
        li.classList.add("refused");
        sending.delete(m.id);
      }
    }
    notice(doc.message);
  }

  function connect() {
    retryTimer = null;
    const url = new URL("ws", location.href); // relative: works under a path prefix
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ session, after: String(lastId) }).toString();
    url.hash = "";
    setStatus("connecting", "connecting…");
    const sock = new WebSocket(url.href);
    ws = sock;
    sock.onopen = () => {
      for (const m of mine) if (!m.acked) sock.send(JSON.stringify(m.frame));
      markAllUnsent(false);
    };
    sock.onmessage = (event) => {
      let doc;
      try {
        doc = JSON.parse(event.data);
      } catch {
        return;
      }
      if (doc.type === "message") showBot(doc);
      else if (doc.type === "earlier") skipEarlier(doc.last);
      else if (doc.type === "ready") {
        attempt = 0;
        showMine(Infinity);
        live = true;
        setStatus("online", "online");
        askAboutOpenLinks(sock);
      } else if (doc.type === "ack") acknowledged(doc.id);
      else if (doc.type === "wait_ended") waitEnded(doc);
      else if (doc.type === "error") refused(doc);
    };
    sock.onclose = (event) => {
      if (ws !== sock) return;
      ws = null;
      markAllUnsent(true);
      if (event.code === 4400) {
        setStatus("offline", "disconnected");
        notice("The server refused this chat: " + event.reason);
        return;
      }
      const delay = Math.min(10000, 500 * 2 ** attempt) * (0.8 + 0.4 * Math.random());
      attempt += 1;
      setStatus("offline", `offline, retrying in ${Math.ceil(delay / 1000)} s`);
      retryTimer = setTimeout(connect, delay);
    };
  }

  function retryNow() {
    if (retryTimer !== null) {
      clearTimeout(retryTimer);
      connect();
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    markTyped();
    submit({ type: "text", text });
    input.focus();
  });
  $("new-chat").addEventListener("click", () => {
    for (const key of ["session", "mine", "used", "ended"]) sessionStorage.removeItem(PREFIX + key);
    location.reload();
  });
  window.addEventListener("online", retryNow);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) retryNow();
  });
  document.querySelector(".avatar").textContent = (document.title.trim()[0] || "b").toUpperCase();
  connect();
})();
