"""The review page's HTTP side (Starlette, run by uvicorn): `GET /` the page, `GET /api/queue`
a reviewer's items, `POST /api/vote`, `GET /api/summary`. Bound to 127.0.0.1 by default;
requests must name this machine in their Host header (a page elsewhere cannot post votes
through the browser), and with an API key every request must carry it."""

from __future__ import annotations

import hmac
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from tunesmith.errors import TunesmithError, first_line
from tunesmith.judge.html import esc, page
from tunesmith.judge.review import Review, summary_lines

LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _check(request: Request) -> JSONResponse | None:
    state = request.app.state
    host = request.headers.get("host", "").rsplit(":", 1)[0]
    if state.local_only and host not in LOCAL_NAMES:
        return _error(403, f"Host {host!r} refused: the review page answers on 127.0.0.1 only")
    if state.api_key:
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        given = given or request.query_params.get("key", "")
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            return _error(401, "missing or wrong API key (?key=... or Authorization: Bearer)")
    return None


async def index(request: Request):
    refused = _check(request)
    if refused is not None:
        return refused
    review: Review = request.app.state.review
    title = f"tunesmith review: {review.output_dir}"
    return HTMLResponse(page(title, BODY.replace("{title}", esc(title)), SCRIPT))


async def queue(request: Request):
    refused = _check(request)
    if refused is not None:
        return refused
    try:
        return JSONResponse(
            request.app.state.review.queue(request.query_params.get("reviewer", ""))
        )
    except TunesmithError as err:
        return _error(400, first_line(err))


async def vote(request: Request):
    refused = _check(request)
    if refused is not None:
        return refused
    try:
        body = json.loads(await request.body())
        entry = request.app.state.review.vote(
            str(body["reviewer"]), int(body["item"]), str(body["key"]), str(body["side"])
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        return _error(400, f"a vote is {{reviewer, item, key, side}}: {err}")
    except TunesmithError as err:
        return _error(400, first_line(err))
    return JSONResponse({"ok": True, "time": entry["time"]})


async def summary(request: Request):
    refused = _check(request)
    if refused is not None:
        return refused
    review: Review = request.app.state.review
    result = review.summary()
    result["lines"] = summary_lines(result, review.a, review.b)
    return JSONResponse(result)


def build_review_app(review: Review, api_key: str | None = None, local_only: bool = True):
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/queue", queue),
            Route("/api/vote", vote, methods=["POST"]),
            Route("/api/summary", summary),
        ]
    )
    app.state.review, app.state.api_key, app.state.local_only = review, api_key, local_only
    return app


BODY = """
<h1>{title}</h1>
<div id="who" hidden>
  <p>Your name keeps your votes apart from other reviewers' (and lets a reload resume):</p>
  <form id="who-form"><input id="who-name" placeholder="reviewer name" required
    pattern="[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"> <button>Start</button></form>
</div>
<div id="review" hidden>
  <p id="progress" class="muted"></p>
  <h2>Prompt</h2><div id="prompt"></div>
  <details><summary>reference answer</summary><div id="reference" class="answer"></div></details>
  <table style="width:100%;table-layout:fixed"><tr>
    <th>Answer 1 (left)</th><th>Answer 2 (right)</th></tr><tr>
    <td><div id="left" class="answer"></div></td><td><div id="right" class="answer"></div></td>
  </tr></table>
  <p>
    <button id="vote-left" data-side="left">Left better <kbd>1</kbd></button>
    <button id="vote-right" data-side="right">Right better <kbd>2</kbd></button>
    <button id="vote-tie" data-side="tie">Tie <kbd>3</kbd></button>
    <button id="vote-both_bad" data-side="both_bad">Both bad <kbd>4</kbd></button>
    <button id="back">Back <kbd>Backspace</kbd></button>
  </p>
  <p class="muted">Keys: 1 or &larr; left better, 2 or &rarr; right better, 3 or t tie,
    4 or b both bad, Backspace back. Votes are saved as you cast them; the latest counts.</p>
</div>
<div id="done" hidden><h2>All items reviewed</h2><p>Thank you. Summary (now that you are
  done, the models' names are shown):</p><pre id="summary"></pre></div>
<p id="error" class="bad"></p>
"""

SCRIPT = r"""
const params = new URLSearchParams(location.search);
const key = params.get("key") || "";
const reviewer = params.get("reviewer");
let items = [], at = 0;
const $ = (id) => document.getElementById(id);
function api(path, body) {
  const opts = {headers: {"Content-Type": "application/json"}};
  if (key) opts.headers["Authorization"] = "Bearer " + key;
  if (body) { opts.method = "POST"; opts.body = JSON.stringify(body); }
  return fetch(path, opts).then(async (r) => {
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  });
}
function fail(err) { $("error").textContent = String(err.message || err); }
function show() {
  const voted = items.filter((x) => x.voted).length;
  if (at >= items.length) { finish(); return; }
  const item = items[at];
  $("review").hidden = false; $("done").hidden = true;
  $("progress").textContent = `item ${at + 1} of ${items.length} (${voted} voted)` +
    (item.voted ? ` - your vote: ${item.voted.replace("_", " ")}` : "");
  $("prompt").innerHTML = "";
  for (const m of item.prompt) {
    const div = document.createElement("div");
    div.className = "answer";
    div.textContent = `${m.role}: ${m.content}`;
    $("prompt").appendChild(div);
  }
  $("reference").textContent = item.reference;
  $("left").textContent = item.left;
  $("right").textContent = item.right;
}
function finish() {
  $("review").hidden = true; $("done").hidden = false;
  api("/api/summary").then((s) => { $("summary").textContent = s.lines.join("\n"); }).catch(fail);
}
function next() {
  const later = items.findIndex((x, i) => i > at && !x.voted);
  const any = items.findIndex((x) => !x.voted);
  at = later >= 0 ? later : (any >= 0 ? any : items.length);
  show();
}
function cast(side) {
  if (at >= items.length) return;
  const item = items[at];
  api("/api/vote", {reviewer, item: item.item, key: item.key, side})
    .then(() => { item.voted = side; $("error").textContent = ""; next(); }).catch(fail);
}
document.querySelectorAll("button[data-side]").forEach((b) =>
  b.addEventListener("click", () => cast(b.dataset.side)));
$("back").addEventListener("click", () => { if (at > 0) { at -= 1; show(); } });
document.addEventListener("keydown", (e) => {
  if (!reviewer || e.target.tagName === "INPUT") return;
  const side = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right",
                "3": "tie", "t": "tie", "4": "both_bad", "b": "both_bad"}[e.key];
  if (side) { e.preventDefault(); cast(side); }
  if (e.key === "Backspace" && at > 0) { e.preventDefault(); at -= 1; show(); }
});
$("who-form").addEventListener("submit", (e) => {
  e.preventDefault();
  params.set("reviewer", $("who-name").value);
  location.search = params.toString();
});
if (!reviewer) { $("who").hidden = false; }
else {
  api("/api/queue?reviewer=" + encodeURIComponent(reviewer)).then((q) => {
    items = q.items;
    const first = items.findIndex((x) => !x.voted);
    at = first >= 0 ? first : items.length;
    show();
  }).catch(fail);
}
"""

__all__ = ["build_review_app"]
