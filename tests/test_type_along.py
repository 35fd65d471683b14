"""Type-along reuse (issue 22): a prompt that typed the first tokens of a stored greedy completion is answered with
its rest, token for token what a cold request returns, and decoding goes on from the cached K/V where it must."""

import numpy as np
import pytest
import torch

from conftest import make_tiny
from greencode.config import GenerationConfig
from greencode.gates import FixedGate, FullGate
from greencode.generate import GatedGenerator
from greencode.prefix_cache import Partition, PrefixCache
from greencode.speculative import LosslessGenerator

NEW = 8
GREEDY = GenerationConfig(max_new_tokens=NEW)


@pytest.fixture(scope="module", params=["llama", "opt"])
def lm(request, tokenizer):
    return make_tiny(request.param, tokenizer=tokenizer)


def tokens(seed, n):
    return torch.randint(300, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cold(lm, prompt, cfg=GREEDY, gate=None):
    [result] = LosslessGenerator(lm).generate([prompt], gate or FullGate(), cfg)
    return result


def store_of(lm, budget=10**9, **kwargs):
    return PrefixCache(budget, lm.fingerprint, **kwargs)


@pytest.mark.parametrize("typed", [1, 3, NEW - 1])
def test_typing_along_returns_the_cold_tokens_and_decodes_on_past_the_stored_part(lm, typed):
    store = store_of(lm)
    gen = GatedGenerator(lm, prefix_cache=store)
    prompt = tokens(0, 24)
    [first] = gen.generate([prompt], FullGate(), GREEDY)
    assert first.cached_completion_tokens == 0 and store.stats().continuations == 1
    along = prompt + first.token_ids[:typed]
    [warm] = gen.generate([along], FullGate(), GREEDY)
    expected = cold(lm, along)
    assert warm.token_ids == expected.token_ids and warm.text == expected.text
    assert warm.token_ids[: NEW - typed] == first.token_ids[typed:]
    assert warm.cached_completion_tokens == NEW - typed  # the rest of the stored part, then decoding
    assert warm.cached_prompt_tokens == len(along)
    assert warm.layers_per_token == [0] * (NEW - typed) + [lm.num_layers] * typed
    # a request asking for no more than the stored part runs no model work: no prompt pass looks anything up
    lookups = store.stats().lookups
    short = GREEDY.model_copy(update={"max_new_tokens": NEW - typed})
    [served] = gen.generate([along], FullGate(), short)
    assert served.token_ids == expected.token_ids[: NEW - typed] and served.finish_reason == "length"
    assert served.cached_completion_tokens == NEW - typed and store.stats().lookups == lookups
    assert store.stats().served_tokens == 2 * (NEW - typed)


def test_stop_sequences_apply_to_served_tokens_and_decoding_goes_on_past_a_stored_stop(lm):
    store = store_of(lm)
    gen = GatedGenerator(lm, prefix_cache=store)
    prompt = tokens(1, 20)
    free = cold(lm, prompt, GREEDY.model_copy(update={"max_new_tokens": 12}))
    stop = lm.tokenizer.decode(free.token_ids[5:7])[1:]  # text that first shows up inside the completion
    with_stop = GREEDY.model_copy(update={"max_new_tokens": 12, "stop": [stop]})
    gen.generate([prompt], FullGate(), GREEDY.model_copy(update={"max_new_tokens": 12}))  # stored without the stop
    along = prompt + free.token_ids[:2]
    [warm] = gen.generate([along], FullGate(), with_stop)
    expected = cold(lm, along, with_stop)
    assert (warm.token_ids, warm.text, warm.finish_reason) == (expected.token_ids, expected.text,
                                                               expected.finish_reason)
    assert warm.finish_reason == "stop_sequence" and warm.cached_completion_tokens == len(warm.token_ids)
    # the other way round: stored where a stop cut it, a request without the stop decodes on after it
    store.clear()
    [stopped] = gen.generate([prompt], FullGate(), with_stop)
    along = prompt + stopped.token_ids[:1]
    [warm] = gen.generate([along], FullGate(), GREEDY)
    assert warm.cached_completion_tokens == len(stopped.token_ids) - 1 and len(warm.token_ids) == NEW
    assert warm.token_ids == cold(lm, along).token_ids


def test_sampling_gated_and_other_partitions_never_use_stored_completions(lm):
    store = store_of(lm)
    gen = GatedGenerator(lm, prefix_cache=store)
    prompt = tokens(2, 20)
    [first] = gen.generate([prompt], FullGate(), GREEDY)
    along = prompt + first.token_ids[:2]
    sampled = GREEDY.model_copy(update={"temperature": 0.8, "seed": 3})
    [warm] = gen.generate([along], FullGate(), sampled)
    assert warm.cached_completion_tokens == 0 and warm.cached_prompt_tokens > 0  # prefix reuse only
    assert warm.token_ids == cold(lm, along, sampled).token_ids
    gate = FixedGate(lm.exit_points[0])
    [gated] = gen.generate([along], gate, GREEDY)
    assert gated.cached_completion_tokens == 0
    assert gated.token_ids == cold(lm, along, GREEDY, gate).token_ids
    assert store.stats().continuations == 1  # neither the sampled nor the gated completion was stored
    [other] = GatedGenerator(lm).scoped(store.scoped(Partition("someone-else"))).generate([along], FullGate(), GREEDY)
    assert other.cached_completion_tokens == 0 and other.cached_prompt_tokens == 0


def test_lossless_requests_type_along_their_own_completions(lm):
    store = store_of(lm)
    gen = LosslessGenerator(lm, prefix_cache=store)
    lossless = GREEDY.model_copy(update={"lossless": True})
    gate = FixedGate(lm.exit_points[0])
    prompt = tokens(3, 20)
    [plain] = gen.generate([prompt], FullGate(), GREEDY)
    along = prompt + plain.token_ids[:3]
    [first] = gen.generate([along], gate, lossless)  # a full-gate completion does not answer a lossless request
    assert first.cached_completion_tokens == 0 and first.token_ids == cold(lm, along).token_ids
    again = along + first.token_ids[:2]
    [warm] = gen.generate([again], gate, lossless)
    assert warm.cached_completion_tokens == NEW - 2 and warm.token_ids == cold(lm, again).token_ids
    assert warm.speculative["layer_passes"] > 0  # it decoded its last two tokens


def test_a_batch_mixes_served_and_decoded_rows(lm):
    store = store_of(lm)
    gen = GatedGenerator(lm, prefix_cache=store)
    a, b = tokens(4, 20), tokens(5, 14)
    firsts = gen.generate([a, b], FullGate(), GREEDY)
    prompts = [a + firsts[0].token_ids[:4], b + tokens(6, 2), b + firsts[1].token_ids[:1]]
    results = gen.generate(prompts, FullGate(), GREEDY)
    assert [r.cached_completion_tokens for r in results] == [NEW - 4, 0, NEW - 1]
    assert [r.token_ids for r in results] == [cold(lm, p).token_ids for p in prompts]


def test_stored_completions_share_the_budget_the_entry_cap_and_the_lru(lm):
    one = (10 + 6) * 8  # bytes of a stored 6-token completion of a 10-token prompt

    def put(store, seed, tenant="a"):
        prompt, completion = tokens(seed, 10), tokens(seed + 1000, 6)
        return store.store_completion(prompt, completion, "full-greedy", Partition(tenant)), prompt, completion

    store = PrefixCache(3 * one + one // 2, lm.fingerprint)
    stored = [put(store, seed) for seed in range(3)]
    assert all(ok for ok, _, _ in stored) and store.stats().bytes_held == 3 * one
    _, prompt0, completion0 = stored[0]
    assert store.continuation(prompt0 + completion0[:2], "full-greedy", Partition("a")) == completion0[2:]
    assert store.continuation(prompt0 + completion0[:2], "lossless-greedy", Partition("a")) is None
    assert store.continuation(prompt0 + completion0[:2], "full-greedy", Partition("b")) is None
    assert store.continuation(prompt0 + completion0, "full-greedy", Partition("a")) is None  # nothing left
    put(store, 3)  # evicts the least recently used: seed 1 (seed 0 was just used)
    assert store.stats().evictions == 1 and store.stats().bytes_held <= store.budget_bytes
    _, prompt1, completion1 = stored[1]
    assert store.continuation(prompt1 + completion1[:1], "full-greedy", Partition("a")) is None
    assert store.insert(tokens(50, 10), torch.zeros(1, 2, 1, 10, 1), Partition("a"))  # 80 bytes of K/V
    assert store.stats().bytes_held <= store.budget_bytes and store.stats().evictions == 2  # seed 2 went
    assert store.continuation(prompt0 + completion0[:1], "full-greedy", Partition("a")) is not None
    # typing along a stored completion adds nothing new; the entry cap counts both kinds
    assert not store.store_completion(prompt0 + completion0[:2], completion0[2:], "full-greedy", Partition("a"))
    capped = PrefixCache(10**9, lm.fingerprint, max_entries=4, tenant_max_entries=2)
    for seed in range(3):
        put(capped, seed)
    capped.insert(tokens(60, 3), torch.zeros(1, 2, 1, 3, 1), Partition("b"))
    capped.insert(tokens(61, 3), torch.zeros(1, 2, 1, 3, 1), Partition("b"))
    assert capped.stats().entries == 4 and capped.stats().continuations == 2
    capped.clear()
    assert capped.stats().entries == 0 and capped.stats().bytes_held == 0


def test_a_stored_completion_alone_over_the_tenant_budget_is_refused(lm):
    store = PrefixCache(64, lm.fingerprint)
    assert not store.store_completion(tokens(7, 10), tokens(8, 4), "full-greedy")
    assert store.stats().rejected == 1 and store.stats().entries == 0
    assert np.array_equal(store.stats().bytes_held, 0)


@pytest.mark.integration
def test_embedded_model_type_along_requests_return_the_cold_text(embedded):
    """20 held-out stdlib files: after a suggestion, the user types its first characters (a whole first token for
    half of the files, part of it for the others); every reply is the cold one, the first half served."""
    from greencode.config import DataConfig
    from greencode.data import load_corpus

    files = [f for f in load_corpus(DataConfig(corpus="stdlib")).split("test") if len(f.text) > 800][:20]
    assert len(files) == 20
    tok = embedded.tokenizer
    cfg = GenerationConfig(max_new_tokens=6)
    gen = GatedGenerator(embedded, prefix_cache=PrefixCache(2**30, embedded.fingerprint))
    before = [f.text[:150] for f in files]
    suggestions = gen.generate(before, FullGate(), cfg)
    typed = []
    for i, (text, s) in enumerate(zip(before, suggestions)):
        first = tok.decode(s.token_ids[:1])
        typed.append(text + (first if i % 2 == 0 else first[: max(1, len(first) - 1)]))
    warm = gen.generate(typed, FullGate(), cfg)
    cold_results = GatedGenerator(embedded).generate(typed, FullGate(), cfg)
    assert [r.text for r in warm] == [r.text for r in cold_results]
    assert [r.token_ids for r in warm] == [r.token_ids for r in cold_results]
    assert sum(r.cached_completion_tokens > 0 for r in warm[::2]) >= 8  # a re-tokenized boundary may differ
