"""The review page's HTTP side (Starlette, run by uvicorn): `GET /` the page, `GET /api/queue`
a reviewer's items, `POST /api/vote`, `GET /api/summary`. Bound to 127.0.0.1 by default; every
request passes the same guard as `tunesmith serve`'s (`tunesmith.serve.guard`): a Host header
naming this server, no foreign Origin (a page elsewhere cannot post votes through the browser),
the API key when there is one, and a vote's body as JSON of at most 64 KiB, sent within the
request timeout."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from tunesmith.errors import TunesmithError, first_line
from tunesmith.judge.html import esc, page
from tunesmith.judge.review import Review, summary_lines
from tunesmith.serve.guard import Access, Refused, check_json_content_type, read_json_body
from tunesmith.serve.runner import REQUEST_TIMEOUT_S

MAX_VOTE_BYTES = 64 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _guarded(handler):
    """`handler` behind the guard, with refusals and bad input as `{"error": message}`."""

    async def run(request: Request):
        try:
            request.app.state.access.check(request)
            if request.method == "POST":
                check_json_content_type(request)
            return await handler(request)
        except Refused as err:
            return _error(err.status, err.message)
        except TunesmithError as err:
            return _error(400, first_line(err))

    return run


async def index(request: Request):
    review: Review = request.app.state.review
    title = f"tunesmith review: {review.output_dir}"
    return HTMLResponse(page(title, BODY.replace("{title}", esc(title)), SCRIPT))


async def queue(request: Request):
    reviewer = request.query_params.get("reviewer", "")
    return JSONResponse(request.app.state.review.queue(reviewer))


async def vote(request: Request):
    state = request.app.state
    body = await read_json_body(request, MAX_VOTE_BYTES, state.request_timeout_s, None)
    fields = {"reviewer": str, "item": int, "key": str, "side": str}
    wrong = [k for k, kind in fields.items() if type(body.get(k)) is not kind]
    if wrong:
        return _error(
            400,
            "a vote is {reviewer, item, key, side}: strings, and item an integer; "
            f"missing or of another type: {', '.join(wrong)}",
        )
    try:
        entry = state.review.vote(body["reviewer"], body["item"], body["key"], body["side"])
    except ValueError as err:
        return _error(400, str(err))
    return JSONResponse({"ok": True, "time": entry["time"]})


async def summary(request: Request):
    review: Review = request.app.state.review
    result = review.summary()
    result["lines"] = summary_lines(result, review.a, review.b)
    return JSONResponse(result)


def build_review_app(
    review: Review,
    api_key: str | None = None,
    hosts: frozenset[str] | None = None,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
):
    """The review page's app; `hosts`: the Host names it answers to (default: loopback)."""
    app = Starlette(
        routes=[
            Route("/", _guarded(index)),
            Route("/api/queue", _guarded(queue)),
            Route("/api/vote", _guarded(vote), methods=["POST"]),
            Route("/api/summary", _guarded(summary)),
        ]
    )
    access = Access(api_key=api_key, key_in_query=True)
    if hosts is not None:
        access = Access(hosts, api_key, key_in_query=True)
    app.state.review, app.state.access = review, access
    app.state.request_timeout_s = request_timeout_s
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
