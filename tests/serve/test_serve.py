"""`tunesmith serve` through the official `openai` client, against a server started on
127.0.0.1 in the test: the bundled tiny model with two LoRA adapters, a prompt-tuning and a
prefix-tuning adapter, all built here. Greedy outputs must equal `tunesmith generate`'s, token
for token, alone and in a mixed batch; every error has its status code and OpenAI's body."""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from helpers.adapters import BUNDLED, adapter_folder
from helpers.models import llama_config
from helpers.runs import run_cli
from helpers.serving import gated_steps, wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from typer.testing import CliRunner

from tunesmith.adapters import load_adapter, save_adapter
from tunesmith.builder import load_for_inference
from tunesmith.cli import app
from tunesmith.errors import AdapterError
from tunesmith.methods.prompt import PrefixTuningConfig, PromptTuningConfig
from tunesmith.methods.prompt.impl import add_prefix_tuning, add_prompt_tuning
from tunesmith.serve.app import Limits, Server, running
from tunesmith.serve.engine import Engine, Params, Sequence
from tunesmith.threads import physical_cpus

KEY = "test-key"
PROMPTS = ["Are these all from nature: leaf stone river", "hello there", "Sort: b a c"]
TOKENS = 16


def _virtual_adapter(folder: Path, kind: str) -> Path:
    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    if kind == "prompt":
        add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=16), kind)
    else:
        add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=8), kind)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 3)  # strong enough to change outputs
    save_adapter(model, folder / kind, names=[kind])
    return folder / kind


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The folder runtime loads may read from (`--adapter-root`)."""
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def folders(root) -> dict[str, Path]:
    return {
        "alpha": adapter_folder(root, BUNDLED, "lora", name="alpha", seed=1, b_scale=3),
        "beta": adapter_folder(root, BUNDLED, "lora", name="beta", seed=2, b_scale=3),
        "gamma": adapter_folder(root, BUNDLED, "lora", name="gamma", seed=4, b_scale=3),
        "prompt": _virtual_adapter(root, "prompt"),
        "prefix": _virtual_adapter(root, "prefix"),
    }


def _server(folders, names=("alpha", "beta", "prompt", "prefix"), **limits) -> Server:
    root = folders["alpha"].parents[1]
    model, tokenizer, _ = load_for_inference(
        str(BUNDLED), [str(folders[n]) for n in names], names=list(names)
    )
    engine = Engine(
        model,
        tokenizer,
        max_running=limits.pop("max_running", 16),
        max_queue=limits.pop("max_queue", 64),
    )
    return Server(engine, "tiny-llama", api_key=KEY, limits=Limits(**limits), adapter_root=root)


@pytest.fixture(scope="module")
def served(folders):
    server = _server(folders)
    with running(server) as url:
        yield server, url


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0)


def _generate(*args: str) -> str:
    result = CliRunner().invoke(app, ["generate", "--max-new-tokens", str(TOKENS), *args])
    assert result.exit_code == 0, result.output
    return result.output.strip()


@pytest.fixture(scope="module")
def generated(folders) -> dict[tuple[str, str], str]:
    """What `tunesmith generate` answers, per (model, prompt): chat and --raw."""
    out = {}
    for name in ("tiny-llama", "alpha", "beta", "prompt", "prefix"):
        source = ["--model", str(BUNDLED)]
        if name != "tiny-llama":
            source += ["--adapter", str(folders[name])]
        for prompt in PROMPTS[:2]:
            out[(name, prompt)] = _generate(*source, prompt)
        out[(name, "raw")] = _generate(*source, "--raw", "def fibonacci(n):")
    return out


def _chat(client, model, prompt, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **{**CHAT, **kw}
    )


CHAT = {"temperature": 0, "max_tokens": TOKENS}


# --- outputs -----------------------------------------------------------------------------------
def test_models_lists_the_base_and_each_adapter(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny-llama", "alpha", "beta", "prompt", "prefix"}
    assert cards["alpha"].parent == "tiny-llama" and cards["tiny-llama"].parent is None
    assert cards["prefix"].method == "prefix" and cards["alpha"].method == "lora"


@pytest.mark.parametrize("model", ["tiny-llama", "alpha", "beta", "prompt", "prefix"])
def test_chat_and_completions_equal_tunesmith_generate(client, generated, model):
    for prompt in PROMPTS[:2]:
        reply = _chat(client, model, prompt)
        assert reply.choices[0].message.content.strip() == generated[(model, prompt)]
        assert reply.object == "chat.completion" and reply.model == model
        usage = reply.usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        finish = reply.choices[0].finish_reason
        assert (finish == "length") == (usage.completion_tokens == TOKENS)
    raw = client.completions.create(
        model=model, prompt="def fibonacci(n):", temperature=0, max_tokens=TOKENS
    )
    assert raw.choices[0].text.strip() == generated[(model, "raw")]
    assert raw.object == "text_completion"


def test_adapters_change_the_output(generated):
    models = ("tiny-llama", "alpha", "beta", "prompt", "prefix")
    # otherwise the comparisons above prove little:
    assert len({generated[(m, PROMPTS[0])] for m in models}) == 5


def test_streaming_gives_the_same_text_in_pieces(client):
    whole = _chat(client, "alpha", PROMPTS[0]).choices[0].message.content
    chunks = list(
        _chat(client, "alpha", PROMPTS[0], stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("stop", "length") and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(pieces) - 2
    text = (
        client.completions.create(
            model="beta", prompt="def fibonacci(n):", temperature=0, max_tokens=TOKENS
        )
        .choices[0]
        .text
    )
    streamed = client.completions.create(
        model="beta", prompt="def fibonacci(n):", temperature=0, max_tokens=TOKENS, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text


def test_the_stream_ends_with_done(served):
    body = {"model": "alpha", "prompt": "def f", "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(served[1] + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_logprobs_are_the_models_own(client):
    """Completions' logprobs equal log_softmax of the base model's logits at each greedy step,
    the chosen token is the most likely one, and its alternatives come in order."""
    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    prompt = "def fibonacci(n):"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    new = out.sequences[0, ids.shape[1] :].tolist()
    expected = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    reply = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0, logprobs=3
    )
    lp = reply.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in new]
    for k, token in enumerate(new):
        assert lp.token_logprobs[k] == pytest.approx(float(expected[k][token]), abs=1e-4)
        top = expected[k].topk(3)
        alternatives = {
            tokenizer.decode([t]): v
            for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        }
        assert lp.top_logprobs[k] == pytest.approx(alternatives, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(new))]
    assert "".join(lp.tokens) == reply.choices[0].text


def test_chat_logprobs_whole_and_streamed(client, generated):
    reply = _chat(client, "alpha", PROMPTS[0], logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content.strip() == generated[("alpha", PROMPTS[0])]
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    for item in content:
        assert item.bytes == list(item.token.encode())
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True
        )
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: the top
    streamed = []
    for chunk in _chat(client, "alpha", PROMPTS[0], logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]
    assert _chat(client, "alpha", PROMPTS[0]).choices[0].logprobs is None  # only when asked


def test_usage_says_how_many_prompt_tokens_came_from_the_prefix_cache(client):
    prompt = "You are a helpful assistant. Answer in one short line. " * 3 + "def fibonacci(n):"
    first, second = (
        client.completions.create(model="beta", prompt=prompt, max_tokens=8, temperature=0)
        for _ in range(2)
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert second.choices[0].text == first.choices[0].text


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["answer", "count", "note"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("model", ["tiny-llama", "beta", "prefix"])
def test_json_schema_responses_are_valid_json_of_the_schema(client, model):
    form = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
    for prompt in PROMPTS:
        reply = _chat(client, model, prompt, response_format=form, max_tokens=64)
        choice = reply.choices[0]
        data = json.loads(choice.message.content)  # a 4M-parameter model, yet valid
        assert choice.finish_reason == "stop"
        assert set(data) == {"answer", "count", "note"} and data["answer"] in ("yes", "no")
        assert isinstance(data["count"], int) and 0 <= data["count"] <= 9
        assert isinstance(data["note"], str) and len(data["note"]) <= 12
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in _chat(client, model, PROMPTS[0], response_format=form, max_tokens=64, stream=True)
        if c.choices
    )
    assert json.loads(streamed) == json.loads(
        _chat(client, model, PROMPTS[0], response_format=form, max_tokens=64)
        .choices[0]
        .message.content
    )


def test_json_object_responses_start_a_json_object(client):
    free = _chat(client, "tiny-llama", "hello there", max_tokens=24).choices[0].message.content
    assert not free.startswith("{")  # what the model writes unconstrained
    # this 4M-parameter model opens a string it does not close within max_tokens (a schema
    # with bounded fields, above, is what makes it finish): cut, as OpenAI does, with "length"
    form = {"type": "json_object"}
    reply = _chat(client, "tiny-llama", "hello there", response_format=form, max_tokens=16)
    assert reply.choices[0].message.content.startswith('{"')
    assert reply.choices[0].finish_reason == "length"


def test_unknown_fields_and_bad_formats_are_refused_by_name(served):
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for body, where in (
        ({**chat, "logit_bias": {"1": 5}}, "logit_bias"),
        ({**chat, "tools": []}, "tools"),
        (
            {**chat, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
            "messages.0.tool_calls",
        ),
    ):
        status, err, _ = _error(served, "POST", "/v1/chat/completions", body)
        assert (status, err["param"]) == (400, where)
        assert err["message"] == f"{where}: tunesmith serve does not take this field; remove it"
    completion = {"model": "alpha", "prompt": "hi", "max_tokens": 4, "best_of": 2}
    status, err, _ = _error(served, "POST", "/v1/completions", completion)
    assert (status, err["param"]) == (400, "best_of")
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    status, err, _ = _error(
        served, "POST", "/v1/chat/completions", {**chat, "response_format": bad}
    )
    assert (status, err["param"]) == (400, "response_format")
    assert err["message"] == "response_format.json_schema.schema: Invalid type: objekt"
    status, err, _ = _error(served, "POST", "/v1/chat/completions", {**chat, "top_logprobs": 2})
    assert err["message"] == "top_logprobs: set logprobs to true as well"
    status, err, _ = _error(
        served, "POST", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}
    )
    assert status == 400 and err["param"] == "top_logprobs"
    # what clients send and we accept: a user id, a message author's name
    named = {**chat, "user": "u-1", "messages": [{"role": "user", "content": "hi", "name": "ann"}]}
    status, body, _ = _error(served, "POST", "/v1/chat/completions", named)
    assert status == 200


def test_stop_strings_n_and_seeded_sampling(client):
    whole = (
        client.completions.create(
            model="alpha", prompt="def fibonacci(n):", temperature=0, max_tokens=TOKENS
        )
        .choices[0]
        .text
    )
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert stop.strip()
    cut = client.completions.create(
        model="alpha", prompt="def fibonacci(n):", temperature=0, max_tokens=TOKENS, stop=[stop]
    ).choices[0]
    assert cut.text == whole[: whole.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(
        model="alpha",
        prompt="def fibonacci(n):",
        temperature=0,
        max_tokens=TOKENS,
        stop=[stop],
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    sampled = [
        client.chat.completions.create(
            model="beta",
            messages=[{"role": "user", "content": "hi"}],
            temperature=1.0,
            max_tokens=12,
            n=3,
            seed=7,
        )
        for _ in range(2)
    ]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1
    assert [c.index for c in sampled[0].choices] == [0, 1, 2]


# --- errors ------------------------------------------------------------------------------------
def _error(served, method, path, body=None, key=KEY, content=None, headers=None):
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    r = httpx.request(
        method, served[1] + path, json=body, content=content, headers=headers, timeout=60
    )
    return r.status_code, r.json()["error"] if r.status_code >= 400 else r.json(), r


def test_errors_have_openai_status_and_body(served, client):
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, err, _ = _error(served, "POST", "/v1/chat/completions", chat, key=None)
    assert status == 401 and err["type"] == "authentication_error"
    assert err["code"] == "invalid_api_key" and "Authorization: Bearer" in err["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served[1] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as found:
        _chat(client, "nope", "hi")
    assert found.value.body["code"] == "model_not_found" and "'nope'" in found.value.message
    status, err, _ = _error(served, "POST", "/v1/chat/completions", {**chat, "temperature": 5})
    assert status == 400 and err["type"] == "invalid_request_error"
    assert err["message"].startswith("temperature: ") and err["param"] == "temperature"
    status, err, _ = _error(served, "POST", "/v1/chat/completions", {**chat, "max_tokens": 9999})
    assert status == 400 and err["param"] == "max_tokens"
    assert err["message"] == "max_tokens: 9999 is more than this server allows (512; --max-tokens)"
    long = {**chat, "messages": [{"role": "user", "content": "word " * 600}]}
    status, err, _ = _error(served, "POST", "/v1/chat/completions", long)
    assert status == 400 and err["code"] == "context_length_exceeded"
    assert err["message"].startswith("This model's maximum context length is 512 tokens.")
    status, err, _ = _error(served, "POST", "/v1/chat/completions", {**chat, "messages": []})
    assert status == 400 and err["message"].startswith("messages: ")
    status, err, _ = _error(served, "POST", "/v1/chat/completions", content=b"{not json")
    assert status == 400 and err["message"].startswith("the body is not valid JSON")
    system_only = {**chat, "messages": [{"role": "system", "content": "x"}]}
    status, err, _ = _error(served, "POST", "/v1/chat/completions", system_only)
    assert status == 400 and "role 'user'" in err["message"]
    big = {**chat, "pad": "x" * (1 << 20)}
    status, err, _ = _error(served, "POST", "/v1/chat/completions", big)
    assert status == 413 and err["code"] == "request_too_large"
    status, err, _ = _error(served, "GET", "/v1/nothing")
    assert status == 404 and err["code"] == "not_found"
    assert _chat(client, "alpha", "hi").choices[0].message.content is not None  # still up


def test_a_failing_request_gets_500_and_the_server_goes_on(served, client, monkeypatch):
    engine = served[0].engine
    real = engine._forward

    def failing(key, adapters, ids, *args):
        if ids.shape[1] > 1 and "beta" in adapters:
            raise RuntimeError("boom")
        return real(key, adapters, ids, *args)

    monkeypatch.setattr(engine, "_forward", failing)
    with pytest.raises(openai.InternalServerError) as failed:
        _chat(client, "beta", "hi")
    assert failed.value.status_code == 500 and failed.value.body["type"] == "server_error"
    assert "RuntimeError" in failed.value.message
    assert _chat(client, "alpha", "hi").choices[0].finish_reason in ("stop", "length")


def test_a_full_queue_answers_429_with_retry_after(folders):
    server = _server(folders, names=("alpha",), max_running=1, max_queue=1)
    with running(server) as url, gated_steps(server.engine):
        engine = server.engine
        first = Sequence([5] * 8, None, Params(max_tokens=400), lambda *a: None)
        engine.submit([first])
        wait_for(lambda: first.generated == 1, "the first sequence was not admitted")
        second = Sequence([5] * 8, None, Params(max_tokens=400), lambda *a: None)
        engine.submit([second])  # waits: the only slot is taken (decode steps are held)
        body = {"model": "alpha", "prompt": "hi", "max_tokens": 4}
        headers = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60, headers=headers)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert "limit 1" in r.json()["error"]["message"]
        first.cancel()
        second.cancel()
    server.limits.timeout_s = 0.0
    with running(server) as url:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60, headers=headers)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


# --- adapters at run time --------------------------------------------------------------------
def test_load_and_unload_adapters_at_run_time(served, client, folders, root):
    body = {"name": "g2", "path": str(folders["gamma"].relative_to(root))}
    status, _, r = _error(served, "POST", "/v1/adapters", body, key=None)
    assert status == 401
    status, card, _ = _error(served, "POST", "/v1/adapters", body)
    assert status == 201 and card["id"] == "g2" and card["parent"] == "tiny-llama"
    expected = _generate("--model", str(BUNDLED), "--adapter", str(folders["gamma"]), PROMPTS[0])
    assert _chat(client, "g2", PROMPTS[0]).choices[0].message.content.strip() == expected
    status, err, _ = _error(served, "POST", "/v1/adapters", body)
    assert status == 400 and "already loaded" in err["message"]
    status, err, _ = _error(served, "POST", "/v1/adapters", {"name": "x", "path": "../.."})
    assert status == 400 and "outside the folder" in err["message"]
    status, err, _ = _error(served, "POST", "/v1/adapters", {"name": "../x", "path": "gamma"})
    assert status == 400 and "is not allowed" in err["message"]
    status, gone, _ = _error(served, "DELETE", "/v1/adapters/g2")
    assert status == 200 and gone["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        _chat(client, "g2", "hi")
    status, err, _ = _error(served, "DELETE", "/v1/adapters/g2")
    assert status == 404


def test_an_adapter_for_another_base_is_refused_with_its_message(served, root):
    other = root / "other"
    config = llama_config(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(other / "base")
    folder = adapter_folder(other, other / "base", "lora", name="wrong", seed=1)
    body = {"name": "wrong", "path": str(folder.relative_to(root))}
    status, err, _ = _error(served, "POST", "/v1/adapters", body)
    assert status == 400 and err["param"] == "path"
    with pytest.raises(AdapterError) as direct:
        load_adapter(AutoModelForCausalLM.from_pretrained(BUNDLED), folder, name="wrong")
    assert err["message"] == str(direct.value) and "\n" not in err["message"]
    assert err["message"].endswith("the adapter was made for another base model or config")
    assert "wrong" not in served[0].engine.adapters()


# --- health, metrics ---------------------------------------------------------------------------
def test_health_and_prometheus_metrics(served, client):
    _chat(client, "alpha", "hi")
    r = httpx.get(served[1] + "/health", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(served[1] + "/metrics", timeout=30).status_code == 401
    r = httpx.get(served[1] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['tunesmith_requests_total{endpoint="chat",status="200"}'] >= 1
    assert values["tunesmith_generated_tokens_total"] > 0
    assert values["tunesmith_time_to_first_token_seconds_count"] > 0
    assert (
        values['tunesmith_time_to_first_token_seconds_bucket{le="+Inf"}']
        == values["tunesmith_time_to_first_token_seconds_count"]
    )
    assert values["tunesmith_tokens_per_second"] > 0
    assert "tunesmith_queue_length" in values and "tunesmith_running_sequences" in values
    assert "# TYPE tunesmith_time_to_first_token_seconds histogram" in r.text


# --- batching ----------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_a_mixed_load_gives_each_request_its_output_alone(served, client):
    """64 requests, 16 at a time, adapters (and the base) mixed at random: each output equals
    the same request's output sent alone, and memory does not grow over a second round."""
    models = ["tiny-llama", "alpha", "beta", "prompt", "prefix"]
    rng = random.Random(0)
    jobs = [(rng.choice(models), rng.choice(PROMPTS), rng.random() < 0.5) for _ in range(64)]

    def send(job):
        model, prompt, chat = job
        if chat:
            return _chat(client, model, prompt).choices[0].message.content
        return (
            client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=TOKENS)
            .choices[0]
            .text
        )

    alone = {job: send(job) for job in set(jobs)}
    engine = served[0].engine
    steps = engine.stats.steps
    rows = engine.stats.step_rows
    rss = []
    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(send, jobs))
        assert outputs == [alone[job] for job in jobs]
        rss.append(_rss_mb())
    assert (engine.stats.step_rows - rows) / (engine.stats.steps - steps) > 3  # batched
    assert engine.running() == 0 and engine.queue_length() == 0 and engine.cached_tokens() == 0
    assert rss[1] - rss[0] < 50, rss


# --- the command -------------------------------------------------------------------------------
def test_serve_refuses_a_public_address_without_an_api_key():
    run = run_cli("serve", "--model", str(BUNDLED), "--host", "0.0.0.0")
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "error: --host 0.0.0.0: binding beyond this machine would open the model to the "
        "network; bind 127.0.0.1, or set --api-key (or the TUNESMITH_API_KEY environment "
        "variable)"
    )


def test_the_serve_command_answers_curl_style_requests(folders):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "serve",
            "--adapter",
            f"a={folders['alpha']}",
            "--model",
            str(BUNDLED),
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        body = {
            "model": "a",
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": TOKENS,
            "temperature": 0,
        }
        plain = httpx.post(url + "/v1/chat/completions", content=json.dumps(body), timeout=60)
        assert plain.status_code == 415 and plain.json()["error"]["message"] == (
            "no Content-Type header: send the body as JSON with the header "
            "'Content-Type: application/json'"
        )
        json_type = {"Content-Type": "application/json"}
        reply = httpx.post(
            url + "/v1/chat/completions", content=json.dumps(body), headers=json_type, timeout=60
        )
        assert reply.status_code == 200
        expected = _generate(
            "--model", str(BUNDLED), "--adapter", str(folders["alpha"]), PROMPTS[0]
        )
        assert reply.json()["choices"][0]["message"]["content"].strip() == expected
        models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        assert models == ["tiny-llama", "a"]
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    core = physical_cpus()[-1]
    assert f"on http://127.0.0.1:{port}/v1; 1 thread pinned to CPUs {core}" in stderr
