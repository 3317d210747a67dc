// The demo WebView page: reads executionId and the flow's input variables from the URL,
// and POSTs the outcome to the bot's /webview/callback (or to ?callback=<url>).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const executionId = params.get("executionId") || "";

  function callbackUrl() {
    const given = params.get("callback");
    if (given) {
      try {
        const u = new URL(given, location.href);
        if (u.protocol === "http:" || u.protocol === "https:") return u.href;
      } catch {
        // fall back to this server's own endpoint
      }
    }
    // Relative to this page (…/demo/webview), so it works under a path prefix.
    return new URL("../webview/callback", location.href).href;
  }
  const callback = callbackUrl();

  const body = $("params").tBodies[0];
  for (const [key, value] of params) {
    const row = body.insertRow();
    row.insertCell().textContent = key;
    row.insertCell().textContent = value;
  }
  $("callback").textContent = callback;
  $("card-name").value = params.get("name") || "";
  $("amount").value = params.get("amount") || "9.99";
  $("price").textContent = $("amount").value;
  $("amount").addEventListener("input", () => {
    $("price").textContent = $("amount").value;
  });

  const buttons = [$("pay"), $("fail")];
  if (!executionId) {
    $("missing").hidden = false;
    for (const b of buttons) b.disabled = true;
  }

  function show(kind, text) {
    const result = $("result");
    result.className = "result " + kind;
    result.textContent = text;
    result.hidden = false;
  }

  const reference = () => "PAY-" + String(crypto.getRandomValues(new Uint32Array(1))[0] % 1000000).padStart(6, "0");

  let final = false; // the server gave its last word on this executionId

  async function report(success) {
    if (final) return;
    const data = success
      ? { reference: reference(), amount: $("amount").value, card_name: $("card-name").value }
      : { reason: "card declined" };
    for (const b of buttons) b.disabled = true;
    show("busy", "Sending…");
    try {
      const response = await fetch(callback, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ executionId, success, data }),
      });
      let answer = {};
      try {
        answer = await response.json();
      } catch {
        // not JSON: shown by status below
      }
      // a final answer (accepted, already done, unknown, too late): no second try
      final = response.ok || [404, 409, 410].includes(response.status);
      if (response.ok) {
        show("ok", success
          ? `Payment done (reference ${data.reference}). You can close this tab and go back to the chat.`
          : "Payment failure reported. You can close this tab and go back to the chat.");
      } else {
        const title = { 404: "Unknown payment.", 409: "Already done.", 410: "Too late." }[response.status] || "Refused.";
        show("error", `${title} ${answer.message || ""} (HTTP ${response.status})`);
      }
    } catch (err) {
      show("error", `Could not reach ${callback}: ${err.message}`);
    } finally {
      for (const b of buttons) b.disabled = !executionId || final;
    }
  }

  $("pay-form").addEventListener("submit", (event) => {
    event.preventDefault();
    report(true);
  });
  $("fail").addEventListener("click", () => report(false));
})();
