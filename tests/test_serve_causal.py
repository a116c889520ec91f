"""`mk serve` on causal LMs: the real server on a free loopback port, spoken to with
the official `openai` client (and httpx where a raw body is the point): answers
equal to in-process CausalLM.generate, streams that add up to the whole answer,
stop strings, OpenAI-style errors, the key, batching under concurrency, the
queue bound, client disconnects, SIGTERM during a stream."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import make_tiny_llm, mk_cli
from test_serve import _metric, call, start, stop

KEY = "s3cret-key-for-tests"
NAME = "tiny-llm"


@pytest.fixture(scope="module")
def llm_server(tiny_llm):
    url, proc = start(tiny_llm, "--api-key", KEY)
    yield {"url": url, "proc": proc}
    assert stop(proc)[0] == 0


@pytest.fixture(scope="module")
def client(llm_server):
    return openai.OpenAI(base_url=f"{llm_server['url']}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(tiny_llm):
    from mk.core.artifact import open_artifact
    from mk.core.runtime.causal_runtime import CausalLM

    return CausalLM.load(open_artifact(tiny_llm, kind="model"), "cpu", 1)


def greedy(lm, prompt_ids, max_new):
    from mk.core.runtime.causal_runtime import Sampling

    return lm.generate([prompt_ids], Sampling(max_new_tokens=max_new))


def chat_text(client, stream: bool, **kw) -> tuple[str, str | None, list]:
    """The answer's text, its finish reason and (streamed) its chunks."""
    if not stream:
        r = client.chat.completions.create(model=NAME, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, [r]
    chunks = list(client.chat.completions.create(model=NAME, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks


def completion_text(client, stream: bool, **kw) -> tuple[str, str | None, list]:
    if not stream:
        r = client.completions.create(model=NAME, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, [r]
    chunks = list(client.completions.create(model=NAME, stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def test_models_are_listed_and_documented(client, llm_server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("other")
    assert e.value.body["code"] == "model_not_found"
    schema = httpx.get(f"{llm_server['url']}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(schema["paths"])
    assert {"ChatCompletionRequest", "CompletionRequest", "ChatCompletion", "ErrorResponse"} <= set(
        schema["components"]["schemas"])
    assert "/predict" not in schema["paths"]
    assert call(f"{llm_server['url']}/v2/health/ready") == (200, {"ready": True})  # no key needed


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_answers_equal_in_process_generate(client, lm, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    expected = greedy(lm, lm.chat_ids(messages), 12)
    text, reason, chunks = chat_text(client, stream, messages=messages, max_tokens=12, temperature=0)
    assert text == expected.texts[0] and reason == expected.finish_reasons[0] == "length"
    if not stream:
        assert chunks[0].usage.prompt_tokens == len(lm.chat_ids(messages))
        assert chunks[0].usage.completion_tokens == 12
    prompt = "The capital of France is"
    expected = greedy(lm, lm.text_ids(prompt), 9)
    text, reason, _ = completion_text(client, stream, prompt=prompt, max_tokens=9, temperature=0)
    assert text == expected.texts[0] and reason == "length"
    ids = lm.text_ids(prompt)  # token ids as the prompt
    assert completion_text(client, False, prompt=ids, max_tokens=9, temperature=0)[0] == expected.texts[0]
    # a temperature in range but so small that logits divided by it overflow: greedy, not a 500
    assert completion_text(client, stream, prompt=prompt, max_tokens=9, temperature=1e-40)[0] == expected.texts[0]


def test_streams_add_up_to_the_whole_answer(client):
    """Sampled with a seed (varied text, odd characters), the same tokens streamed or not."""
    for seed in (1, 2, 3):
        kw = dict(messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=40, temperature=1.0,
                  seed=seed)
        whole, reason, _ = chat_text(client, False, **kw)
        streamed, s_reason, chunks = chat_text(client, True, stream_options={"include_usage": True}, **kw)
        assert streamed == whole and s_reason == reason and len(chunks) > 3
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 40
        kw = dict(prompt="Once upon a time", max_tokens=30, temperature=0.9, top_p=0.95, seed=seed)
        assert completion_text(client, True, **kw)[0] == completion_text(client, False, **kw)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client, stream):
    kw = dict(prompt="Once upon a time", max_tokens=40, temperature=1.0, seed=7)
    full, reason, _ = completion_text(client, False, **kw)
    assert len(full) > 12 and reason == "length"
    stop = full[8:11]
    cut = full.find(stop)
    text, reason, _ = completion_text(client, stream, stop=stop, **kw)
    assert (text, reason) == (full[:cut], "stop")
    text, reason, _ = completion_text(client, stream, stop=["never in this text \x00", stop], **kw)
    assert (text, reason) == (full[:cut], "stop")


def test_generate_ends_rows_at_their_stop_string_and_budget(lm):
    """In-process, the runtime's own stopping: a stop string ends the row (no token
    past it), and rows of one batch each keep their own budget."""
    from mk.core.runtime.causal_runtime import Sampling

    prompt = lm.text_ids("Once upon a time")
    sampled = Sampling(max_new_tokens=30, temperature=1.0, seed=3)
    full = lm.generate([prompt], sampled)
    stop = full.texts[0][6:9]
    cut = lm.generate([prompt], Sampling(max_new_tokens=30, temperature=1.0, seed=3, stop=(stop,)))
    assert cut.texts[0] == full.texts[0][:full.texts[0].find(stop)] and cut.finish_reasons == ["stop"]
    assert cut.tokens[0] == full.tokens[0][:len(cut.tokens[0])] and len(cut.tokens[0]) < 30
    assert stop in lm.decode(cut.tokens[0]) and stop not in lm.decode(cut.tokens[0][:-1])
    other = lm.text_ids("The capital of France is")
    both = lm.generate([prompt, other], Sampling(max_new_tokens=99), max_new=[3, 7])
    assert [len(t) for t in both.tokens] == [3, 7] and both.finish_reasons == ["length", "length"]
    assert both.tokens[1] == greedy(lm, other, 7).tokens[0]


def _error(url: str, route: str, body, status: int, param: str | None = None, code: str | None = None) -> dict:
    r = httpx.post(f"{url}{route}", content=body if isinstance(body, bytes) else json.dumps(body),
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == status, (body, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["param"] == param and (code is None or error["code"] == code), error
    return error


def test_bad_parameters_get_openai_errors_never_500(llm_server):
    url = llm_server["url"]
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}]}
    done = {"model": NAME, "prompt": "Hi"}
    for route, extra, status, param in [
        ("/v1/completions", {"max_tokens": -1}, 422, "max_tokens"),
        ("/v1/completions", {"max_tokens": "ten"}, 422, "max_tokens"),
        ("/v1/chat/completions", {"temperature": 2.5}, 422, "temperature"),
        ("/v1/chat/completions", {"temperature": True}, 422, "temperature"),
        ("/v1/chat/completions", {"top_p": 0}, 422, "top_p"),
        ("/v1/chat/completions", {"stop": 3}, 422, "stop"),
        ("/v1/completions", {"seed": -1}, 422, "seed"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"n": 2}, 400, "n"),
        ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/completions", {"logprobs": 2}, 400, "logprobs"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": [5, 10 ** 6]}, 400, "prompt"),
        ("/v1/completions", {"model": "other"}, 404, "model"),
    ]:
        _error(url, route, (chat if "chat" in route else done) | extra, status, param)
    # the context: 256 positions
    _error(url, "/v1/completions", done | {"prompt": "word " * 300}, 400, "prompt", "context_length_exceeded")
    _error(url, "/v1/chat/completions", chat | {"max_tokens": 250}, 400, "max_tokens", "context_length_exceeded")
    _error(url, "/v1/completions", done | {"max_tokens": 256, "stream": True}, 400, "max_tokens")
    _error(url, "/v1/completions", b"{not json", 400)
    _error(url, "/v1/completions", {"prompt": "Hi"}, 422, "model")
    # the classifier's routes on a causal LM, with what to use instead
    r = httpx.post(f"{url}/predict", json={"inputs": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi " * 300}])
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert "mk_requests_total{code=\"500\"" not in metrics(url)


def test_the_key_is_enforced(llm_server):
    url = llm_server["url"]
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_bench_url_says_a_text_generation_server_is_not_its_kind(llm_server):
    url = llm_server["url"]
    proc = mk_cli("bench", "--url", url, "--api-key", KEY, "--iters", "1")
    assert proc.returncode == 2, proc.stderr
    assert (f"error: {url}: {NAME!r} is a text-generation model (served on the OpenAI-compatible /v1 routes); "
            "mk bench --url load-tests a classifier's KServe v2 routes") in proc.stderr
    assert "--model-name" not in proc.stderr
    # a name the server does not serve at all is still that
    proc = mk_cli("bench", "--url", url, "--api-key", KEY, "--iters", "1", "--model-name", "other")
    assert proc.returncode == 2 and "no model 'other' there (HTTP 404)" in proc.stderr, proc.stderr


def test_concurrent_requests_are_batched_and_routed_to_each_their_own(client, lm, llm_server):
    """Eight requests at once, with different prompts and lengths, half of them
    streamed: generate runs some of them together, and each gets what it would alone."""
    url = llm_server["url"]
    prompts = [f"Story number {i} begins with" + " a" * i for i in range(8)]
    lengths = [6 + 3 * i for i in range(8)]
    expected = [greedy(lm, lm.text_ids(p), n).texts[0] for p, n in zip(prompts, lengths)]
    before = metrics(url)

    def ask(i):
        return completion_text(client, i % 2 == 1, prompt=prompts[i], max_tokens=lengths[i], temperature=0)[0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == expected
    after = metrics(url)
    calls = _metric(after, "mk_batch_size_count") - _metric(before, "mk_batch_size_count")
    rows = _metric(after, "mk_batch_size_sum") - _metric(before, "mk_batch_size_sum")
    assert rows == 8 and calls < 8, (calls, rows)  # some generate call ran more than one request
    assert _metric(after, "mk_completion_tokens_total") - _metric(before, "mk_completion_tokens_total") == sum(
        lengths)
    prompt_tokens = sum(len(lm.text_ids(p)) for p in prompts)
    assert _metric(after, "mk_prompt_tokens_total") - _metric(before, "mk_prompt_tokens_total") == prompt_tokens
    ttft = "mk_time_to_first_token_seconds_count"
    assert _metric(after, ttft) - _metric(before, ttft) == 8
    assert 'mk_requests_total{code="200",route="/v1/completions"}' in after


def test_a_client_that_goes_away_stops_its_generation(llm_server):
    url = llm_server["url"]
    before = metrics(url)
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(100):  # the row stops at its next step
        after = metrics(url)
        if _metric(after, "mk_batch_size_count") > _metric(before, "mk_batch_size_count"):
            break
        time.sleep(0.05)
    made = _metric(after, "mk_completion_tokens_total") - _metric(before, "mk_completion_tokens_total")
    assert 1 <= made < 200


def test_a_request_queued_behind_a_long_generation_gets_its_504_at_its_deadline(tiny_llm):
    """The batcher thread is busy with a generation for as long as it runs: a request queued
    behind it was answered 504 only once that generation ended (minutes, behind a long one)."""
    url, proc = start(tiny_llm, "--timeout", "0.2", "--max-batch-size", "1")
    try:
        long = {"model": NAME, "prompt": "Hello", "max_tokens": 240, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # started: it runs to its end
            before = _metric(metrics(url), "mk_batch_size_count")
            queued = httpx.post(f"{url}/v1/completions", json={**long, "stream": False, "max_tokens": 2},
                                timeout=60)
            ended = _metric(metrics(url), "mk_batch_size_count") - before  # generations ended meanwhile
            rest = [line for line in lines if line]
        assert queued.status_code == 504 and "deadline" in queued.json()["error"]["message"], queued.text
        assert ended == 0 and rest[-1] == "data: [DONE]"  # answered while the long one still ran
    finally:
        code, err = stop(proc)
    assert code == 0, err


@pytest.fixture(scope="module")
def templateless_llm(tmp_path_factory, llm_tokenizer_dir):
    """A causal LM whose tokenizer has no chat template."""
    out = make_tiny_llm(tmp_path_factory.mktemp("llms") / "plain-llm", llm_tokenizer_dir, seed=1)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_overload_no_chat_template_and_sigterm_during_a_stream(templateless_llm):
    url, proc = start(templateless_llm, "--max-queue", "1", "--max-batch-size", "1")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="plain-llm", messages=[{"role": "user", "content": "Hi"}])
        assert e.value.body["code"] == "no_chat_template" and "/v1/completions" in e.value.body["message"]
        body = {"model": "plain-llm", "prompt": "Hello", "max_tokens": 120, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=60), range(6)))
        refused = [r for r in answers if r.status_code == 503]
        assert refused and {r.status_code for r in answers} == {200, 503}
        assert refused[0].headers["Retry-After"] == "1" and refused[0].json()["error"]["type"] == "server_error"
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200  # recovered
        # SIGTERM while a stream runs: the stream is finished, then the server exits 0
        with httpx.stream("POST", f"{url}/v1/completions", json=body | {"max_tokens": 200, "stream": True},
                          timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(__import__("signal").SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_fuzzing_the_openai_routes_never_gives_a_500(llm_server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    url, auth = llm_server["url"], {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth)
    failures, sent = [], []
    for result in schema.get_all_operations():
        op = result.ok()
        if not op.path.startswith("/v1/"):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                r = case.call(base_url=url, headers=auth, timeout=60)
                sent.append(r.status_code)
                if r.status_code >= 500 or (r.status_code >= 400 and "message" not in r.json().get("error", {})):
                    failures.append((op.label, r.status_code, r.text[:200]))
            try:
                fuzz()
            except Unsatisfiable:  # GET /v1/models has nothing to make invalid
                assert mode == GenerationMode.NEGATIVE
    assert not failures, failures[:5]
    assert len(sent) > 50 and {422, 200} <= set(sent)


@pytest.mark.slow
def test_the_embedded_model_answers_a_real_question(smollm2_dir):
    url, proc = start(smollm2_dir, "--model-name", "smollm2")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20, temperature=0)
        assert "Paris" in answer.choices[0].message.content
    finally:
        assert stop(proc)[0] == 0
