import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy
import pytest
import torch
from dspy.lm15 import Config, Message, Request
from dspy.utils.exceptions import ContextWindowExceededError
from safetensors.torch import load_file, save_file

from steper_dspy.errors import SteperError
from steper_dspy.lm import chat_prompt_ids, chat_training_ids
from steper_dspy.lm.engine import COMPLETED_MARKER, TransformersEngine, cut_at_stop
from steper_dspy.lm.local import local_lm

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who was born in Paris?"}]
SCRIPT = "[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]] and then some junk"


@pytest.fixture(autouse=True)
def steper_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPER_CACHE", str(tmp_path / "steper-cache"))


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return local_lm(tiny_model_dir, max_tokens=8, cache=False)


def _request(lm, *, max_tokens=None, stop=(), temperature=0.0, seed=None):
    config = Config(max_tokens=max_tokens, temperature=temperature, stop=tuple(stop), seed=seed)
    return Request(
        model=lm.model, system=MESSAGES[0]["content"], messages=(Message.user(MESSAGES[1]["content"]),), config=config
    )


@pytest.fixture
def scripted(tiny_model_dir, monkeypatch):
    """A local LM whose model emits SCRIPT token by token (forced logits), whatever the prompt."""
    # The engine computes a prompt but its last token in one pass, then every token (the prompt's last one
    # first) in a pass of its own: a pass over several tokens starts a generation and emits nothing. No prefix
    # cache, so that every prompt has such a pass.
    engine = TransformersEngine(tiny_model_dir, dtype="float32", max_tokens=64, prefix_cache_tokens=0)
    net, tokenizer = engine.load()
    script = tokenizer(SCRIPT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    forward, step = net.forward, [0]

    def scripted_forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            step[0] = 0
            return forward(*args, **kwargs)
        output = forward(*args, **kwargs)
        forced = torch.full_like(output.logits[:, -1, :], -1e9)
        forced[:, script[min(step[0], len(script) - 1)]] = 0
        output.logits[:, -1, :] = forced
        step[0] += 1
        return output

    monkeypatch.setattr(net, "forward", scripted_forward)
    scripted_lm = dspy.LM(engine.model_string, engine=engine, max_tokens=64, temperature=0.0, cache=False)
    yield scripted_lm, step, len(script)
    engine.close()


@pytest.fixture
def scripted_prose(tiny_model_dir, monkeypatch):
    """A local LM (marker patience 5) whose model writes "The answer" over and over, never a field marker."""
    engine = TransformersEngine(
        tiny_model_dir, dtype="float32", max_tokens=64, marker_patience=5, prefix_cache_tokens=0
    )
    net, tokenizer = engine.load()
    prose = tokenizer("The answer", add_special_tokens=False)["input_ids"]
    forward, step = net.forward, [0]

    def prose_forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # the prompt's pass (see `scripted`)
            return forward(*args, **kwargs)
        output = forward(*args, **kwargs)
        forced = torch.full_like(output.logits[:, -1, :], -1e9)
        forced[:, prose[step[0] % len(prose)]] = 0
        output.logits[:, -1, :] = forced
        step[0] += 1
        return output

    monkeypatch.setattr(net, "forward", prose_forward)
    yield dspy.LM(engine.model_string, engine=engine, max_tokens=64, temperature=0.0, cache=False), 5
    engine.close()


def test_chat_prompt_ids_match_the_template(lm):
    _, tokenizer = lm.engine.load()
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    inputs, labels = chat_training_ids(tokenizer, MESSAGES, "Paris")
    assert inputs[: len(ids)] == ids and inputs[-1] == tokenizer.eos_token_id
    assert labels[: len(ids)] == [-100] * len(ids) and labels[len(ids) :] == inputs[len(ids) :]


def test_model_string_names_the_weights(lm, tiny_model_dir, tmp_path):
    fingerprint = lm.engine.fingerprint
    assert lm.model == f"steper-local/{tiny_model_dir.name}@{fingerprint}"
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / tiny_model_dir.name))
    assert local_lm(other).model == lm.model  # same content, same string
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert local_lm(other).model != lm.model


def test_raw_call_is_greedy_deterministic_and_bounded(lm):
    first = lm(_request(lm))
    assert isinstance(first.text, str)
    assert first.usage.output_tokens <= 8 and first.usage.input_tokens > 10
    assert lm(_request(lm)).text == first.text
    short = lm(_request(lm, max_tokens=2))
    assert short.usage.output_tokens <= 2
    with pytest.warns(DeprecationWarning):
        outputs = lm(messages=MESSAGES)
    assert outputs == [first.text]
    assert lm.history[-1]["usage"]["completion_tokens"] == first.usage.output_tokens


def test_sampling_follows_the_seed(lm):
    a = lm(_request(lm, temperature=1.0, seed=7, max_tokens=6))
    b = lm(_request(lm, temperature=1.0, seed=7, max_tokens=6))
    assert a.text == b.text


def test_threads_share_one_model(lm):
    expected = lm(_request(lm)).text
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: lm(_request(lm)).text, range(4)))
    assert texts == [expected] * 4


def test_async_call(lm):
    response = asyncio.run(lm.acall(_request(lm)))
    assert response.text == lm(_request(lm)).text


QUESTIONS = [f"Who was born in city number {i}?" + " Think." * (i % 3) for i in range(8)]


def _ask(lm, question, **config):
    request = Request(model=lm.model, messages=(Message.user(question),), config=Config(temperature=0.0, **config))
    return lm(request).text


def _generate_reference(lm, question, max_new_tokens):
    """transformers' own greedy `generate` on one prompt, as the engine formats it."""
    net, tokenizer = lm.engine.load()
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])
    with torch.inference_mode():
        out = net.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def test_concurrent_requests_are_batched_with_the_same_greedy_outputs(tiny_model_dir):
    sequential = local_lm(tiny_model_dir, dtype="float32", max_tokens=12, cache=False, max_batch_size=1)
    expected = [_ask(sequential, q) for q in QUESTIONS]
    assert expected == [_generate_reference(sequential, q, 12) for q in QUESTIONS]
    batched = local_lm(tiny_model_dir, dtype="float32", max_tokens=12, cache=False, max_batch_size=8)
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda q: _ask(batched, q), QUESTIONS))
    assert texts == expected  # left padding changes no greedy output
    batcher = batched.engine._ensure_loaded().batcher
    assert batcher.rows_decoded > batcher.forward_passes  # steps shared by several requests


def test_a_request_joins_a_running_batch_and_leaves_it_when_done(tiny_model_dir, monkeypatch):
    lm = local_lm(tiny_model_dir, dtype="float32", cache=False, max_batch_size=8, prefix_cache_tokens=0)
    alone = [lm(_request_for(lm, q, 30)) for q in QUESTIONS[:2]]
    batcher = lm.engine._ensure_loaded().batcher
    net, _ = lm.engine.load()
    forward, steps, pool = net.forward, [0], ThreadPoolExecutor(1)
    late: list = []

    def forward_that_sends_a_second_request(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # a decode step
            steps[0] += 1
            if steps[0] == 5:  # the first request is decoding: the second one arrives now
                late.append(pool.submit(lambda: lm(_request_for(lm, QUESTIONS[1], 3))))
                while batcher._queue.empty():
                    pass
        return forward(*args, **kwargs)

    monkeypatch.setattr(net, "forward", forward_that_sends_a_second_request)
    passes = batcher.forward_passes
    first = lm(_request_for(lm, QUESTIONS[0], 30))
    second = late[0].result()
    assert first.text == alone[0].text and first.usage.output_tokens == alone[0].usage.output_tokens
    assert second.usage.output_tokens <= 3 and alone[1].text.startswith(second.text)
    # The second request's steps were the first's: no step of its own.
    assert batcher.forward_passes - passes == first.usage.output_tokens


def test_greedy_replies_apply_the_models_repetition_penalty_as_generate_does(tiny_model_dir, tmp_path):
    from transformers import GenerationConfig

    penalised = tmp_path / "penalised"
    shutil.copytree(tiny_model_dir, penalised)
    config = GenerationConfig.from_pretrained(penalised)
    config.repetition_penalty = 1.5
    config.save_pretrained(penalised)
    lm = local_lm(penalised, dtype="float32", max_tokens=20, cache=False, max_batch_size=8)
    expected = [_generate_reference(lm, q, 20) for q in QUESTIONS[:4]]
    plain = local_lm(tiny_model_dir, dtype="float32", max_tokens=20, cache=False)
    assert expected != [_generate_reference(plain, q, 20) for q in QUESTIONS[:4]]  # the penalty changes replies
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda q: _ask(lm, q), QUESTIONS[:4])) == expected


def test_generation_settings_the_batcher_does_not_apply_are_named_in_a_warning(tiny_model_dir, caplog, monkeypatch):
    from steper_dspy.lm.batching import ContinuousBatcher

    net, tokenizer = local_lm(tiny_model_dir, dtype="float32", cache=False).engine.load()
    with caplog.at_level("WARNING", logger="steper_dspy.lm.batching"):
        ContinuousBatcher(net, tokenizer, set()).close()
    assert caplog.records == []  # the tiny model's config asks for nothing the batcher lacks
    config = net.generation_config
    monkeypatch.setattr(config, "min_p", 0.0)  # set explicitly, but to values that change nothing
    monkeypatch.setattr(config, "typical_p", 1.0)
    monkeypatch.setattr(config, "min_new_tokens", 0)
    with caplog.at_level("WARNING", logger="steper_dspy.lm.batching"):
        ContinuousBatcher(net, tokenizer, set()).close()
    assert caplog.records == []
    monkeypatch.setattr(config, "no_repeat_ngram_size", 3)
    with caplog.at_level("WARNING", logger="steper_dspy.lm.batching"):
        ContinuousBatcher(net, tokenizer, set()).close()
    assert "no_repeat_ngram_size" in caplog.text and "differ" in caplog.text


def test_a_closed_batcher_fails_requests_instead_of_hanging(tiny_model_dir):
    from steper_dspy.lm.batching import ContinuousBatcher, GenerationSettings

    lm = local_lm(tiny_model_dir, dtype="float32", cache=False)
    net, tokenizer = lm.engine.load()
    batcher = ContinuousBatcher(net, tokenizer, {tokenizer.eos_token_id})
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    assert batcher.generate(prompt, GenerationSettings(max_new_tokens=3))[0]
    batcher.close()
    with pytest.raises(RuntimeError, match="unloaded"):
        batcher.generate(prompt, GenerationSettings(max_new_tokens=3))
    with pytest.raises(ValueError, match="empty prompt"):
        batcher.generate([], GenerationSettings(max_new_tokens=3))


def test_a_prompt_that_fails_to_compute_fails_alone_and_the_batch_decodes_on(tiny_model_dir, monkeypatch):
    from steper_dspy.lm import batching
    from steper_dspy.lm.batching import ContinuousBatcher, GenerationSettings

    lm = local_lm(tiny_model_dir, dtype="float32", cache=False)
    net, tokenizer = lm.engine.load()
    batcher = ContinuousBatcher(net, tokenizer, set())  # no eos: the first request decodes all its tokens
    first, bad = (chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS[:2])
    settings = GenerationSettings(max_new_tokens=10)
    alone = batcher.generate(first, settings)
    prefill, forward, steps, pool, late = batching.prefill_row, net.forward, [0], ThreadPoolExecutor(1), []

    def prefill_that_fails_for_the_bad_prompt(model, prompt, *args):
        if prompt == bad:
            raise RuntimeError("out of memory")
        return prefill(model, prompt, *args)

    def forward_that_sends_the_bad_request(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # a decode step of the first request
            steps[0] += 1
            if steps[0] == 3:
                late.append(pool.submit(batcher.generate, bad, settings))
                while batcher._queue.empty():
                    pass
        return forward(*args, **kwargs)

    monkeypatch.setattr(batching, "prefill_row", prefill_that_fails_for_the_bad_prompt)
    monkeypatch.setattr(net, "forward", forward_that_sends_the_bad_request)
    assert batcher.generate(first, settings) == alone
    with pytest.raises(RuntimeError, match="out of memory"):
        late[0].result()
    assert steps[0] > 3  # the bad request arrived while the first one was decoding
    batcher.close()


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(tiny_model_dir):
    lm = local_lm(tiny_model_dir, dtype="float32", cache=False, max_batch_size=8)
    sampled = Request(
        model=lm.model,
        messages=(Message.user(QUESTIONS[3]),),
        config=Config(temperature=1.0, top_k=20, top_p=0.9, seed=11, max_tokens=12),
    )
    alone = lm(sampled).text
    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(lambda q=q: _ask(lm, q, max_tokens=12)) for q in QUESTIONS[:5]]
        together = pool.submit(lambda: lm(sampled).text).result()
        [other.result() for other in others]
    assert together == alone


def _request_for(lm, question, max_tokens):
    return Request(
        model=lm.model, messages=(Message.user(question),), config=Config(temperature=0.0, max_tokens=max_tokens)
    )


def test_a_reply_without_a_field_marker_stops_at_the_patience(scripted_prose):
    lm, patience = scripted_prose
    response = lm(_request(lm, max_tokens=60))
    assert response.usage.output_tokens == patience and response.finish_reason == "stop"


def test_a_reply_that_begins_a_marker_is_not_stopped(scripted):
    scripted_lm, _, _ = scripted
    scripted_lm.engine.marker_patience = 2
    assert scripted_lm(_request(scripted_lm)).text == f"[[ ## answer ## ]]\nParis\n\n{COMPLETED_MARKER}"


def test_a_prompt_beyond_the_context_is_a_clear_error(tiny_model_dir):
    lm = local_lm(tiny_model_dir, dtype="float32", cache=False, max_tokens=8)
    with pytest.raises(ContextWindowExceededError, match="beyond the model's context of 8192 tokens"):
        lm(Request(model=lm.model, messages=(Message.user("word " * 9000),), config=Config(max_tokens=8)))


def test_cut_at_stop():
    assert cut_at_stop(f"a{COMPLETED_MARKER}junk", []) == (f"a{COMPLETED_MARKER}", True)
    assert cut_at_stop("answer\n\nmore", ["\n\n"]) == ("answer", True)
    assert cut_at_stop(f"x STOP {COMPLETED_MARKER}", ["STOP"]) == ("x ", True)
    assert cut_at_stop("plain", ["STOP"]) == ("plain", False)


def test_generation_stops_after_the_marker(scripted):
    scripted_lm, step, script_length = scripted
    response = scripted_lm(_request(scripted_lm))
    assert response.text == f"[[ ## answer ## ]]\nParis\n\n{COMPLETED_MARKER}"
    assert response.finish_reason == "stop" and step[0] < script_length - 2
    assert scripted_lm(_request(scripted_lm, stop=["\n\n"])).text == "[[ ## answer ## ]]\nParis"


def test_predict_parses_the_answer(scripted):
    scripted_lm, _, _ = scripted
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=scripted_lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        assert predict(question="Who was born in Paris?").answer == "Paris"


def test_program_save_load_round_trip(tiny_model_dir, tmp_path):
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    lm = local_lm(model_dir, max_tokens=5, cache=False)
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    program.save(tmp_path / "program.json")
    state = json.loads((tmp_path / "program.json").read_text())["lm"]["engine"]["state"]
    assert state["model"] == str(model_dir) and state["max_tokens"] == 5
    loaded = dspy.Predict("question -> answer")
    loaded.load(tmp_path / "program.json", allow_unsafe_lm_state=True)
    assert loaded.lm.model == lm.model and isinstance(loaded.lm.engine, TransformersEngine)
    assert loaded.lm.kwargs["max_tokens"] == 5
    assert loaded.lm(_request(loaded.lm)).text == lm(_request(lm)).text

    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SteperError, match="changed since this program was saved"):
        dspy.Predict("question -> answer").load(tmp_path / "program.json", allow_unsafe_lm_state=True)


def test_lazy_load_errors_stay_steper_errors(tiny_model_dir, tmp_path):
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    (model_dir / "model.safetensors").write_bytes(b"garbage")
    broken = local_lm(model_dir, cache=False)
    with pytest.raises(SteperError, match="model.safetensors"):
        broken(_request(broken))


def _chain_requests(lm):
    """Requests like a chain's steps: each prompt extends the one before, then its own instructions follow."""
    passages = [f"Passage {i}: the city number {i} lies in the country number {i % 5}." for i in range(12)]
    requests = []
    for step in (4, 8, 12):
        text = "Question: which country?\n" + "\n".join(passages[:step]) + f"\nStep {step}: write the next fact."
        requests.append(Request(model=lm.model, messages=(Message.user(text),), config=Config(temperature=0.0)))
    return requests


def test_a_cached_prompt_prefix_is_not_computed_again_and_changes_no_greedy_output(tiny_model_dir):
    plain = local_lm(tiny_model_dir, dtype="float32", max_tokens=10, cache=False, prefix_cache_tokens=0)
    cached = local_lm(tiny_model_dir, dtype="float32", max_tokens=10, cache=False)
    expected = [plain(r).text for r in _chain_requests(plain)]
    responses = [cached(r) for r in _chain_requests(cached)]  # one at a time: each reuses the last
    assert [r.text for r in responses] == expected
    prefixes = cached.engine._ensure_loaded().batcher.prefix_cache
    assert prefixes.hits == 2 and prefixes.reused_tokens > 100
    # Each response reports the prompt tokens served from the cache, as vLLM's usage does.
    reported = [r.usage.cache_read_tokens for r in responses]
    assert reported[0] == 0 and reported[1] > 50 and sum(reported) == prefixes.reused_tokens
    # Concurrent chains batched together, some rows with a cached prefix and some without.
    fresh = local_lm(tiny_model_dir, dtype="float32", max_tokens=10, cache=False, prefix_cache_tokens=4096)
    first = _chain_requests(fresh)[0]
    fresh(first)
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda r: fresh(r).text, _chain_requests(fresh)))
    assert texts == expected
