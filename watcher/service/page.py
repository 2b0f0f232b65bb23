"""The live status page at `/` (WATCHER_STATUS_PAGE; on in `watcher demo`).

Rendered here, on the server, from the same snapshot /health serves plus the recent
work: the page's script only fetches the `live` fragment again every few seconds and
swaps it in, so what a person sees is written once, in Python. No build step and nothing
from elsewhere: the script and the style sheet are served by the daemon itself
(`static/`), and the Content-Security-Policy holds the page to that.
"""

from __future__ import annotations

import time
from html import escape
from importlib.resources import files
from typing import Any
from urllib.parse import quote

from watcher.core.outcome import Outcome
from watcher.core.progress import BIN_SECONDS, Bins
from watcher.service.hooks import RecentWork

STATIC = files("watcher.service") / "static"
# Where the page's script and style come from, and nothing else.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
REFRESH_SECONDS = 2


def static_file(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def page(live: str | None) -> str:
    """The whole page; `live` is None when a token is needed first (the script asks for it)."""
    body = live if live is not None else (
        '<p class="locked">This status page shows document names, so it needs the token of '
        "<code>WATCHER_WEBHOOK_TOKEN</code>.</p>")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>watcher status</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/status.css">
<script src="/static/status.js" defer></script>
</head>
<body data-refresh="{REFRESH_SECONDS}" data-locked="{'true' if live is None else 'false'}">
<header><h1>watcher</h1><span id="updated"></span></header>
<form id="token" hidden>
<label>Token <input type="password" name="token" autocomplete="current-password"></label>
<button type="submit">Show</button>
</form>
<main id="live">{body}</main>
</body>
</html>
"""


def live(health: dict[str, Any], recent: RecentWork, pages_read: Bins, result_link: str) -> str:
    """The part of the page that changes: /health's snapshot, the pages read per bin and
    the documents finished lately."""
    return "\n".join([
        _summary(health, pages_read),
        _chart(pages_read, recent.finished),
        _engine(health),
        _in_progress(health),
        _recent(recent, result_link),
    ])


def _summary(health: dict[str, Any], pages_read: Bins) -> str:
    engine = health["engine"]
    state = "draining" if health["draining"] else health["status"]
    reachable = health["s3"]["reachable"]
    s3 = "reachable" if reachable else ("not checked yet" if reachable is None else "unreachable")
    in_progress = health["in_progress"]
    tiles = [
        ("backlog", str(health["backlog_documents"]), "documents waiting"),
        ("in-progress", str(in_progress["documents"]),
         f"{in_progress['pages_done']} / {in_progress['pages_total']} pages"),
        ("throughput", _per_minute(pages_read), "pages a minute, last 5 min"),
        ("engine", escape(engine["state"]), escape(f"{engine['name']} {engine['model'] or ''}")),
        ("s3", s3, escape(health["s3"]["bucket"])),
    ]
    cells = "".join(f'<div class="tile" id="tile-{name}"><b>{value}</b><span>{label}</span></div>'
                    for name, value, label in tiles)
    return (f'<section id="summary" class="{escape(state)}"><p class="state">{escape(state)} · '
            f'version {escape(str(health["version"]))} · up {_duration(health["uptime_seconds"])}</p>'
            f'<div class="tiles">{cells}</div></section>')


def _per_minute(pages_read: Bins) -> str:
    window = pages_read.series()[-(300 // BIN_SECONDS):]
    return f"{sum(count for _start, count in window) / 5:.1f}"


def _chart(pages_read: Bins, finished: Bins) -> str:
    """Pages read per bin over the window, as bars of an inline SVG."""
    bins = pages_read.series()
    documents = dict(finished.series())
    width, height, gap = 600, 80, 2
    step = width / len(bins)
    top = max([count for _start, count in bins] + [1])
    bars = []
    for i, (start, pages) in enumerate(bins):
        tall = height * pages / top
        label = (f"{time.strftime('%H:%M:%S', time.localtime(start))}: {pages} pages read, "
                 f"{documents.get(start, 0)} documents finished")
        bars.append(f'<rect x="{i * step:.1f}" y="{height - tall:.1f}" width="{step - gap:.1f}" '
                    f'height="{tall:.1f}"><title>{label}</title></rect>')
    return (f'<section id="chart"><h2>Pages read, every {BIN_SECONDS} s, last '
            f'{len(bins) * BIN_SECONDS // 60} minutes (highest {top})</h2>'
            f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img">'
            f'{"".join(bars)}</svg></section>')


def _engine(health: dict[str, Any]) -> str:
    engine = health["engine"]
    parts = ['<section id="engine"><h2>Engine</h2>']
    if engine.get("error") or engine.get("unavailable"):
        parts.append(f'<p class="problem">{escape(str(engine.get("error") or engine["unavailable"]))}</p>')
    vlm = engine.get("vlm_requests")
    if vlm is not None:
        used = vlm["inflight"] / vlm["limit"] if vlm["limit"] else 0.0
        queue = ("–" if vlm.get("server_running") is None
                 else f"{vlm['server_running']:g} running, {vlm['server_waiting']:g} waiting")
        parts.append(
            '<table class="vlm"><tr><th>VLM request limit</th><th>in flight</th><th>utilisation</th>'
            f'<th>upper bound</th><th>server queue</th><th>mode</th></tr><tr><td>{vlm["limit"]}</td>'
            f'<td>{vlm["inflight"]}</td><td>{used:.0%}</td><td>{vlm["upper_bound"]}</td>'
            f'<td>{queue}</td><td>{escape(vlm["mode"])}</td></tr></table>')
    workers = engine.get("workers") or []
    if workers:
        rows = "".join(
            f'<tr class="{escape(w["state"])}"><td>{w["index"]}</td><td>{escape(w["state"])}</td>'
            f'<td>{w["pid"] or "–"}</td><td>{w["calls"]}</td><td>{w["restarts"]}</td>'
            f'<td>{escape(w["last_restart_reason"] or "–")}</td>'
            f'<td>{w["rss_mb"] if w["rss_mb"] is not None else "–"}</td></tr>'
            for w in workers)
        parts.append('<table class="workers"><tr><th>worker</th><th>state</th><th>pid</th><th>calls</th>'
                     f'<th>restarts</th><th>last restart</th><th>RSS MB</th></tr>{rows}</table>')
    parts.append("</section>")
    return "".join(parts)


def _in_progress(health: dict[str, Any]) -> str:
    shown = health["in_progress"]["shown"]
    if not shown:
        return '<section id="in-progress"><h2>In progress</h2><p class="none">nothing</p></section>'
    rows = []
    for doc in shown:
        total = doc["pages_total"]
        pages = (f'<progress value="{doc["pages_done"]}" max="{total}"></progress> '
                 f'{doc["pages_done"]} / {total}' if total is not None else "opening")
        rows.append(f'<tr class="working"><td class="key">{escape(doc["key"])}</td><td>{pages}</td>'
                    f'<td>{_duration(doc["seconds"])}</td></tr>')
    more = health["in_progress"]["documents"] - len(shown)
    tail = f'<p class="more">and {more} more</p>' if more > 0 else ""
    return ('<section id="in-progress"><h2>In progress</h2><table><tr><th>document</th><th>pages</th>'
            f'<th>for</th></tr>{"".join(rows)}</table>{tail}</section>')


def _recent(recent: RecentWork, result_link: str) -> str:
    if not recent.last:
        return '<section id="recent"><h2>Finished</h2><p class="none">nothing yet</p></section>'
    rows = []
    for item in recent.last:
        r = item.report
        outcome = r.outcome.value if r.outcome is not Outcome.ERROR else f"error {r.code or ''}"
        output = (f'<a class="result" href="{escape(result_link + quote(r.output))}">{escape(r.output)}</a>'
                  if r.output else escape(r.message or ""))
        rows.append(
            f'<tr class="{escape(r.outcome.value)}"><td>{time.strftime("%H:%M:%S", time.localtime(item.at))}'
            f'</td><td class="key">{escape(r.ref.key)}</td><td>{escape(outcome)}</td>'
            f'<td>{r.pages if r.pages is not None else "–"}</td><td>{r.seconds:.1f} s</td>'
            f"<td>{output}</td></tr>")
    return ('<section id="recent"><h2>Finished</h2><table><tr><th>at</th><th>document</th><th>outcome</th>'
            f'<th>pages</th><th>took</th><th>result</th></tr>{"".join(rows)}</table></section>')


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
