// The status page: fetch the live fragment every few seconds and swap it in. The server
// renders everything; this only asks again, carries the token when one is needed, and
// opens result links with it.
"use strict";
(function () {
  const body = document.body;
  const live = document.getElementById("live");
  const form = document.getElementById("token");
  const updated = document.getElementById("updated");
  const every = Number(body.dataset.refresh || "2") * 1000;
  const KEY = "watcher-status-token";

  function headers() {
    const token = sessionStorage.getItem(KEY);
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function locked(message) {
    form.hidden = false;
    if (message) updated.textContent = message;
  }

  async function refresh() {
    let response;
    try {
      response = await fetch("/status/live", { headers: headers(), cache: "no-store" });
    } catch (err) {
      updated.textContent = "daemon not answering; trying again";
      updated.className = "stale";
      return;
    }
    if (response.status === 401) {
      sessionStorage.removeItem(KEY);
      locked("a token is needed");
      return;
    }
    if (!response.ok) {
      updated.textContent = "status answered " + response.status;
      updated.className = "stale";
      return;
    }
    live.innerHTML = await response.text();
    form.hidden = true;
    updated.textContent = "updated " + new Date().toLocaleTimeString();
    updated.className = "";
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    sessionStorage.setItem(KEY, form.elements.token.value);
    form.elements.token.value = "";
    refresh();
  });

  // A plain link cannot carry the token: fetch the result with it and show that.
  live.addEventListener("click", async function (event) {
    const link = event.target.closest("a.result");
    if (!link || !sessionStorage.getItem(KEY)) return;
    event.preventDefault();
    const response = await fetch(link.href, { headers: headers() });
    const blob = await response.blob();
    window.open(URL.createObjectURL(blob), "_blank");
  });

  if (body.dataset.locked === "true") locked();
  refresh();
  setInterval(refresh, every);
})();
