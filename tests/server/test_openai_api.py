"""The OpenAI API through the official `openai` client, against a FakeEngine (tests/server/fake_engine.py)."""

from __future__ import annotations

import openai
import pytest

from .fake_engine import SCRIPT, FakeEngine, expected_text, fake_logprob

MODEL = "fake-model"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
CHAT_PROMPT = "[system] be brief\n[user] hi\n[assistant] "


# --- completions -------------------------------------------------------------------------------


def test_completion_basic(srv):
    r = srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert isinstance(r.created, int)
    [c] = r.choices
    assert (c.index, c.text, c.finish_reason, c.logprobs) == (0, expected_text(5), "length", None)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)  # BOS + "hi"


def test_completion_default_max_tokens_is_16(srv):
    r = srv.client.completions.create(model=MODEL, prompt="hi")
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completion_token_prompt_and_model_optional(srv):
    r = srv.client.completions.create(model=MODEL, prompt=[1, 104, 105], max_tokens=3)
    assert r.usage.prompt_tokens == 3 and r.choices[0].text == expected_text(3)
    _, prompt_ids, _ = srv.engine.started[-1]
    assert prompt_ids == [1, 104, 105]


def test_completion_batch_prompts_index_per_prompt_times_n(srv):
    r = srv.client.completions.create(model=MODEL, prompt=["a", "bb"], n=2, max_tokens=4, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text == expected_text(4, index=c.index % 2, seed=3, greedy=False)
    assert r.usage.prompt_tokens == 2 + 3 and r.usage.completion_tokens == 16
    prompts = [ids for _, ids, _ in srv.engine.started[-2:]]
    assert sorted(prompts) == [[1, 97], [1, 98, 98]]


def test_completion_echo(srv):
    r = srv.client.completions.create(model=MODEL, prompt="say:", max_tokens=3, echo=True)
    assert r.choices[0].text == "say:" + expected_text(3)


def test_completion_logprobs(srv):
    r = srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == list(expected_text(4))
    assert lp.token_logprobs == [fake_logprob(i) for i in range(4)]
    assert lp.text_offset == [0, 1, 2, 3]
    # The two best alternatives (the sampled token is the best one in the fake).
    assert lp.top_logprobs[0] == {"t": fake_logprob(0), "h": fake_logprob(0) - 1}
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_completion_logprobs_zero_gives_sampled_token_only(srv):
    r = srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=2, logprobs=0)
    assert r.choices[0].logprobs.top_logprobs == [{"t": fake_logprob(0)}, {"h": fake_logprob(1)}]


def test_completion_stop_string(srv):
    r = srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=30, stop=[" brown", "zzz"])
    c = r.choices[0]
    assert (c.text, c.finish_reason) == ("the quick", "stop")
    assert c.model_extra["stop_reason"] == " brown"
    assert r.usage.completion_tokens == len("the quick brown")


def test_completion_stop_string_included(srv):
    r = srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=30, stop=" brown",
                                      extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == "the quick brown"


def test_stop_token_ids_eos_and_ignore_eos(make_server):
    s = make_server(FakeEngine(eos_after=6))
    r = s.client.completions.create(model=MODEL, prompt="hi", max_tokens=20, extra_body={"stop_token_ids": [ord("q")]})
    c = r.choices[0]
    assert (c.text, c.finish_reason, c.model_extra["stop_reason"]) == ("the ", "stop", ord("q"))
    r = s.client.completions.create(model=MODEL, prompt="hi", max_tokens=20)
    c = r.choices[0]
    assert (c.text, c.finish_reason, c.model_extra["stop_reason"]) == ("the qu", "stop", None)
    r = s.client.completions.create(model=MODEL, prompt="hi", max_tokens=20, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20


def test_sampling_fields_reach_sampling_params(srv):
    srv.client.completions.create(
        model=MODEL, prompt="hi", max_tokens=3, temperature=0.7, top_p=0.9, seed=11, presence_penalty=0.5,
        frequency_penalty=-0.5, user="someone", stop="xyz", logit_bias={"65": 3.5, "66": -100},
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "skip_special_tokens": False,
                    "min_tokens": 2, "some_future_field": {"a": 1}})
    _, _, p = srv.engine.started[-1]
    assert (p.temperature, p.top_p, p.seed, p.presence_penalty, p.frequency_penalty) == (0.7, 0.9, 11, 0.5, -0.5)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.max_tokens, p.stop) == (5, 0.1, 1.2, 3, ["xyz"])
    assert p.skip_special_tokens is False and p.n == 1 and p.logprobs is None
    assert p.logit_bias == {65: 3.5, 66: -100.0} and p.min_tokens == 2


def test_bad_logit_bias_and_min_tokens_are_400s_naming_them(srv):
    import openai

    for extra, param in (({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                         ({"min_tokens": 9}, "min_tokens")):
        with pytest.raises(openai.BadRequestError) as err:
            srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body=extra)
        assert err.value.body["param"] == param, err.value.body


def test_completion_stream(srv):
    chunks = list(srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=6, n=2, temperature=1.0,
                                                stream=True))
    texts: dict[int, str] = {0: "", 1: ""}
    finish = {}
    for ch in chunks:
        assert ch.object == "text_completion" and ch.id == chunks[0].id and ch.usage is None
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {i: expected_text(6, index=i, greedy=False) for i in (0, 1)}
    assert finish == {0: "length", 1: "length"}


def test_completion_stream_include_usage_echo_logprobs(srv):
    stream = srv.client.completions.create(model=MODEL, prompt="ab", max_tokens=3, stream=True, echo=True,
                                           logprobs=1, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(ch.usage is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 3)
    text = "".join(c.text for ch in chunks for c in ch.choices)
    assert text == "ab" + expected_text(3)
    tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    assert tokens == ["<s>", "a", "b"] + list(expected_text(3))


def test_completion_stream_stop_string_split_across_tokens(srv):
    chunks = list(srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=40, stream=True, stop="fox"))
    assert "".join(c.text for ch in chunks for c in ch.choices) == "the quick brown "
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- chat --------------------------------------------------------------------------------------


def test_chat_basic(srv):
    r = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=7)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    [c] = r.choices
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", expected_text(7), "length")
    # The template's text, without BOS added (the template writes its own special tokens).
    _, prompt_ids, _ = srv.engine.started[-1]
    assert srv.engine.tokenizer.decode(prompt_ids) == CHAT_PROMPT and prompt_ids[0] != 1
    assert r.usage.prompt_tokens == len(CHAT_PROMPT) and r.usage.completion_tokens == 7


def test_chat_max_completion_tokens_and_default(srv):
    r = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=4)
    assert r.usage.completion_tokens == 4
    # No limit given: whatever the context leaves.
    r = srv.client.chat.completions.create(model=MODEL, messages=CHAT)
    assert r.usage.completion_tokens == srv.engine.max_model_len - len(CHAT_PROMPT)


def test_chat_content_parts(srv):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    srv.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert srv.engine.tokenizer.decode(srv.engine.started[-1][1]) == "[user] hi\n[assistant] "


def test_chat_n_seeded_choices_differ_and_repeat(srv):
    def run():
        r = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, n=3, temperature=0.8,
                                               seed=1)
        return [c.message.content for c in r.choices]

    first = run()
    assert first == [expected_text(5, index=i, seed=1, greedy=False) for i in range(3)]
    assert len(set(first)) == 3 and run() == first


def test_chat_logprobs(srv):
    r = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == list(expected_text(3))
    assert [t.logprob for t in content] == [fake_logprob(i) for i in range(3)]
    assert content[0].bytes == list(b"t")
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("t", fake_logprob(0)), ("h", fake_logprob(0) - 1)]
    r = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, logprobs=True)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)
    r = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert r.choices[0].logprobs is None


def test_chat_stream_with_usage(srv):
    stream = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    assert content == expected_text(5)
    finishing = [c for ch in chunks for c in ch.choices if c.finish_reason]
    assert [c.finish_reason for c in finishing] == ["length"]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(CHAT_PROMPT), 5)
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_stream_n_stop_logprobs(srv):
    stream = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, n=2, stream=True,
                                                stop=["o"], logprobs=True, top_logprobs=1,
                                                temperature=0)
    content = {0: "", 1: ""}
    tokens = {0: [], 1: []}
    finish = {}
    for ch in stream:
        for c in ch.choices:
            content[c.index] += c.delta.content or ""
            if c.logprobs and c.logprobs.content:
                tokens[c.index] += [t.token for t in c.logprobs.content]
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert content == {0: "the quick br", 1: "the quick br"}
    assert finish == {0: "stop", 1: "stop"}
    assert tokens[0] == list("the quick bro")


def test_chat_stream_without_usage_has_no_usage_field(srv):
    chunks = list(srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, stream=True))
    assert all(ch.usage is None and ch.choices for ch in chunks)


def test_models(srv):
    models = srv.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "vibee" and models.data[0].model_extra["max_model_len"] == 256
    assert srv.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        srv.client.models.retrieve("gpt-17")


# --- errors ------------------------------------------------------------------------------------


def _bad(call, **kw):
    with pytest.raises(openai.BadRequestError) as info:
        call(**kw)
    return info.value


def test_bad_request_errors(srv):
    comp = srv.client.completions.create
    chat = srv.client.chat.completions.create
    cases = [
        (comp, dict(model=MODEL, prompt="hi", temperature=5), "temperature"),
        (comp, dict(model=MODEL, prompt="hi", max_tokens=-3), "max_tokens"),
        (comp, dict(model=MODEL, prompt="hi", max_tokens=0), "max_tokens"),
        (comp, dict(model=MODEL, prompt="hi", max_tokens=1000), "max_tokens"),
        (comp, dict(model=MODEL, prompt="x" * 300, max_tokens=1), "prompt"),
        (comp, dict(model=MODEL, prompt=["ok", "x" * 300], max_tokens=1), "prompt[1]"),
        (comp, dict(model=MODEL, prompt=[1, 500], max_tokens=1), "prompt"),
        (comp, dict(model=MODEL, prompt="hi", top_p=0), "top_p"),
        (comp, dict(model=MODEL, prompt="hi", n=17), "n"),
        (comp, dict(model=MODEL, prompt="hi", logprobs=21), "logprobs"),
        (comp, dict(model=MODEL, prompt="hi", extra_body={"top_k": -5}), "top_k"),
        (comp, dict(model=MODEL, prompt="hi", stop=[""]), "stop"),
        (comp, dict(model=MODEL, prompt="hi", stream_options={"include_usage": True}), "stream_options"),
        (comp, dict(model=MODEL, prompt=[]), "prompt"),
        (chat, dict(model=MODEL, messages=[{"role": "user", "content": "x" * 300}]), "messages"),
        (chat, dict(model=MODEL, messages=CHAT, max_completion_tokens=1000), "max_completion_tokens"),
        (chat, dict(model=MODEL, messages=CHAT, top_logprobs=2), "top_logprobs"),
        (chat, dict(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=50), "top_logprobs"),
        (chat, dict(model=MODEL, messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (chat, dict(model=MODEL, messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (chat, dict(model=MODEL, messages=[]), "messages"),
        (chat, dict(model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
         "messages[0].content[0]"),
    ]
    for call, kw, param in cases:
        err = _bad(call, **kw)
        assert err.status_code == 400, kw
        body = err.body
        assert body["param"] == param, (kw, body)
        assert body["type"] == "invalid_request_error" and "\n" not in body["message"] and body["message"]
    assert not srv.engine.started  # nothing reached the engine


def test_unknown_model_is_404(srv):
    with pytest.raises(openai.NotFoundError) as info:
        srv.client.chat.completions.create(model="gpt-17", messages=CHAT)
    assert info.value.code == "model_not_found" and info.value.body["param"] == "model"


def test_engine_closed_is_503(make_server):
    s = make_server(FakeEngine())
    s.engine.closed = True
    with pytest.raises(openai.InternalServerError) as info:
        s.client.completions.create(model=MODEL, prompt="hi")
    assert info.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as info:
        list(s.client.chat.completions.create(model=MODEL, messages=CHAT, stream=True))
    assert info.value.status_code == 503


def test_engine_failure_mid_stream_is_reported_in_band(make_server):
    s = make_server(FakeEngine(fail_after=2))
    with pytest.raises(openai.APIError, match="fake engine failure"):
        list(s.client.completions.create(model=MODEL, prompt="hi", max_tokens=10, stream=True))
    # Before the first output, it is a plain 500.
    s.engine.fail_after = 0
    with pytest.raises(openai.InternalServerError, match="fake engine failure"):
        s.client.completions.create(model=MODEL, prompt="hi", max_tokens=10)


def test_api_key(make_server):
    s = make_server(api_key="sekret")
    assert s.client.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices[0].text == "t"
    wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model=MODEL, messages=CHAT)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    wrong.close()


def test_script_is_long_enough_for_tests():
    assert len(SCRIPT) > 40


def test_system_fingerprint_in_bodies_and_every_stream_chunk(srv):
    """One fingerprint for this server's configuration, on responses and on each chunk (OpenAI's shape)."""
    messages = [{"role": "user", "content": "hi"}]
    body = srv.client.completions.create(model="fake-model", prompt="hi", max_tokens=3)
    chat = srv.client.chat.completions.create(model="fake-model", messages=messages, max_tokens=3)
    stream = srv.client.chat.completions.create(model="fake-model", messages=messages, max_tokens=3, stream=True)
    chunks = list(stream)
    fingerprints = {body.system_fingerprint, chat.system_fingerprint, *(c.system_fingerprint for c in chunks)}
    assert len(chunks) > 1 and len(fingerprints) == 1 and fingerprints.pop().startswith("fp_")
