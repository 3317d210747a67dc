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
        sending.set(m.id, li);
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

  function webAddress(url) {
    try {
      const u = new URL(url, location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch {
      return null;
    }
  }

  function showBot(doc) {
    if (typeof doc.id !== "number" || doc.id <= lastId) return; // shown already
    showMine(doc.id);
    lastId = doc.id;
    const li = el("li", "msg bot");
    li.dataset.id = String(doc.id);
    li.append(el("div", "bubble", doc.text));
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
      } else {
        a.classList.add("broken");
        a.title = "This button does not point to a web page.";
      }
      row.append(a);
      li.append(row);
    }
    append(li);
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
      li.classList.remove("sending");
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
        li.classList.remove("sending");
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
      } else if (doc.type === "ack") acknowledged(doc.id);
      else if (doc.type === "error") refused(doc);
    };
    sock.onclose = (event) => {
      if (ws !== sock) return;
      ws = null;
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
    submit({ type: "text", text });
    input.focus();
  });
  $("new-chat").addEventListener("click", () => {
    for (const key of ["session", "mine", "used"]) sessionStorage.removeItem(PREFIX + key);
    location.reload();
  });
  window.addEventListener("online", retryNow);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) retryNow();
  });
  document.querySelector(".avatar").textContent = (document.title.trim()[0] || "b").toUpperCase();
  connect();
})();
