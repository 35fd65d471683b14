"""Prefix cache through the generator: exact reuse of full-depth K/V, LRU within a byte budget, threads."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import make_tiny
from greencode.config import GenerationConfig
from greencode.gates import FixedGate, FullGate, Gate
from greencode.generate import GatedGenerator
from greencode.prefix_cache import Partition, PrefixCache, full_depth_tokens

NEW = 8
GREEDY = GenerationConfig(max_new_tokens=NEW)


@pytest.fixture(scope="module", params=["llama", "opt"])
def lm(request):
    return make_tiny(request.param, vocab_size=4096)


def tokens(seed, n):
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fresh(lm, budget=10**9):
    return PrefixCache(budget, lm.fingerprint)


def cached(lm, store):
    return GatedGenerator(lm, prefix_cache=store)


def cold(lm, prompts, gate=None, n=NEW):
    return [r.token_ids for r in GatedGenerator(lm).generate(prompts, gate or FullGate(),
                                                             GenerationConfig(max_new_tokens=n))]


def entry_bytes(lm, n):
    probe = fresh(lm)
    cached(lm, probe).prefill([tokens(999, n)], False)
    return probe.stats().bytes_held


def test_reused_prefix_gives_the_cold_tokens_and_logits(lm):
    base = tokens(0, 48)
    store = fresh(lm)
    gen = cached(lm, store)
    gen.prefill([base[:40]], False)  # the prompt pass stores the prompt
    prompt = base[:40] + tokens(1, 5)  # the next keystroke: same start, a few new tokens
    warm = gen.prefill([prompt], False)
    assert warm.cached_tokens == [40]
    reference = gen.step(warm.input_ids, warm.attention_mask, None, FullGate()).logits  # no cache at all
    torch.testing.assert_close(warm.output.logits, reference, rtol=0, atol=1e-4)
    [result] = gen.generate([prompt], FullGate(), GREEDY)
    assert result.cached_prompt_tokens == 44  # all but the last token: its logits start decoding
    assert result.token_ids == cold(lm, [prompt])[0]


def test_batch_rows_reuse_different_prefix_lengths(lm):
    a, b = tokens(2, 40), tokens(3, 30)
    store = fresh(lm)
    gen = cached(lm, store)
    gen.prefill([a, b], False)
    prompts = [a + tokens(4, 3), b[:20] + tokens(5, 6), tokens(6, 4), a]
    results = gen.generate(prompts, FullGate(), GREEDY)
    # The rows run their last S = 6 positions together (b's row has 6 new tokens): a row with a
    # shorter remainder recomputes a few more of its own tokens, the unmatched 4-token row is
    # left-padded among them, and a prompt equal to a stored one still recomputes its last token.
    assert [r.cached_prompt_tokens for r in results] == [37, 20, 0, 34]
    assert [r.token_ids for r in results] == cold(lm, prompts)
    stats = store.stats()
    assert (stats.lookups, stats.hits, stats.reused_tokens) == (6, 3, 37 + 20 + 34)
    assert stats.prompt_tokens == 40 + 30 + 43 + 26 + 4 + 40


def test_batched_and_concurrent_requests_with_overlapping_prefixes_are_exact(lm):
    """Four threads share one cache too small for everything (evictions happen); some requests are batches."""
    base = tokens(7, 36)
    store = fresh(lm, budget=3 * entry_bytes(lm, 40))
    prompts = [base[: 20 + 2 * i] + tokens(100 + i, 1 + i % 3) for i in range(8)]
    requests = [[prompts[i]] if i % 3 else [prompts[i], prompts[(i + 5) % 8]] for i in range(8)]
    expected = [cold(lm, r) for r in requests]
    barrier = threading.Barrier(4)

    def request(i):
        if i < 4:
            barrier.wait()  # the first four start together
        results = cached(lm, store).generate(requests[i], FullGate(), GREEDY)
        assert store.stats().bytes_held <= store.budget_bytes
        return [r.token_ids for r in results], [r.cached_prompt_tokens for r in results]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(request, range(8)))
    assert [ids for ids, _ in got] == expected
    assert sum(sum(reused) for _, reused in got) > 0
    stats = store.stats()
    assert stats.evictions > 0 and stats.bytes_held <= stats.budget_bytes


def test_entries_are_never_changed_by_the_requests_that_reuse_them(lm):
    store = fresh(lm)
    gen = cached(lm, store)
    base = tokens(8, 30)
    gen.prefill([base], False)
    entry = store.longest_prefix(base)[1]
    snapshot = entry.clone()
    warm = gen.prefill([base + tokens(9, 2)], False)  # reuses the entry, then stores its longer prompt
    for layer in warm.cache.layers:  # even code that writes the request's cache in place
        layer.keys.zero_()
        layer.values.fill_(float("nan"))
    longer = store.longest_prefix(base)[1]
    assert torch.equal(entry, snapshot) and torch.equal(longer[:, :, :, :30], snapshot)
    warm = gen.prefill([base + tokens(10, 3)], False)
    attn = torch.cat([warm.attention_mask, torch.ones_like(warm.attention_mask[:, :1])], dim=1)
    gen.step(warm.output.logits.argmax(-1)[:, None], attn, warm.cache, FullGate())  # update() on every layer
    warm.cache.crop(-3)
    assert torch.equal(entry, snapshot) and torch.equal(longer[:, :, :, :30], snapshot)


def test_budget_is_never_exceeded_and_lru_entries_go_first(lm):
    def insert(store, seed, n):
        return store.insert(tokens(seed, n), torch.randn(lm.num_layers, 2, 2, n, 16))

    one = lm.num_layers * 2 * 2 * 10 * 16 * 4  # bytes of a 10-token entry
    store = PrefixCache(3 * one + one // 2, lm.fingerprint)
    for seed in range(3):
        assert insert(store, seed, 10)
    store.longest_prefix(tokens(0, 10))  # seed 0 becomes the most recently used
    for seed in range(3, 12):
        insert(store, seed, 10)
        assert store.stats().bytes_held <= store.budget_bytes
    assert store.longest_prefix(tokens(0, 10))[0] == 0  # evicted in the end, but after seeds 1 and 2
    assert store.stats().evictions == 9 and store.stats().entries == 3
    assert not insert(store, 99, 40)  # alone larger than the budget: refused, nothing evicted for it
    assert store.stats().rejected == 1 and store.stats().entries == 3
    assert not PrefixCache(0, lm.fingerprint).insert(tokens(1, 1), torch.zeros(lm.num_layers, 2, 2, 1, 16))


def test_generation_fills_the_cache_past_its_budget_and_never_holds_more(lm):
    # room for two requests' K/V and their stored completions (type-along reuse: 8 bytes a token, same budget)
    store = fresh(lm, budget=2 * (entry_bytes(lm, 24 + NEW - 1) + 8 * (24 + NEW)))
    gen = cached(lm, store)
    for i in range(6):
        gen.generate([tokens(20 + i, 24)], FullGate(), GREEDY)
        assert store.stats().bytes_held <= store.budget_bytes
    stats = store.stats()
    assert (stats.entries, stats.continuations, stats.evictions) == (4, 2, 8)
    assert stats.bytes_held > stats.budget_bytes // 2


def test_covered_and_extended_sequences_are_stored_once(lm):
    store = fresh(lm)
    gen = cached(lm, store)
    base = tokens(30, 20)
    gen.prefill([base[:10]], False)
    gen.prefill([base], False)  # extends the first: replaces it
    gen.prefill([base[:15]], False)  # covered by the second: nothing new
    stats = store.stats()
    assert stats.entries == 1
    assert stats.bytes_held == store.longest_prefix(base)[1].numel() * 4


def test_full_depth_tokens():
    prompt, completion = [1, 2, 3], [10, 11, 12, 13]
    assert full_depth_tokens(prompt, completion, [30, 30, 30, 30], 30) == [1, 2, 3, 10, 11, 12]
    assert full_depth_tokens(prompt, completion, [30, 30, 12, 30], 30) == [1, 2, 3, 10]  # 11 exited
    assert full_depth_tokens(prompt, completion, [30, 8, 30, 30], 30) == [1, 2, 3]
    assert full_depth_tokens(prompt, [10], [30], 30) == [1, 2, 3]


class ExitAtStep(Gate):
    """Full depth, except decode step ``k`` (1-based), which exits at ``layer``."""

    def __init__(self, k, layer):
        self.k, self.layer, self.calls = k, layer, 0

    def decision_layers(self, exit_points, num_layers):
        return [self.layer]

    def exit_mask(self, hidden, layer, lm):
        self.calls += 1  # one decision layer: one call per step
        return torch.full((hidden.shape[0],), self.calls == self.k, dtype=torch.bool), None


@pytest.mark.parametrize("gate_name", ["fixed", "mixed"])
def test_propagated_kv_is_never_stored(lm, gate_name):
    gate = FixedGate(4) if gate_name == "fixed" else ExitAtStep(4, lm.exit_points[0])
    prompt = tokens(40, 20)
    store = fresh(lm)
    [result] = cached(lm, store).generate([prompt], gate, GenerationConfig(max_new_tokens=10))
    ids, layers = result.token_ids, result.layers_per_token
    first_exit = 1 if gate_name == "fixed" else 4  # index of the first token an exited step produced
    assert layers[first_exit] < lm.num_layers and set(layers[:first_exit]) == {lm.num_layers}
    kept = len(prompt) + first_exit - 1
    assert store.longest_prefix(prompt + ids)[0] == kept
    # what was left out really differs from the full model's K/V: storing it would not be exact
    gen = GatedGenerator(lm)
    full = gen.prefill([prompt + ids], False).cache.layers[-1].keys[0, :, kept]
    pre = gen.prefill([prompt], False)
    attn = pre.attention_mask
    replay = FixedGate(4) if gate_name == "fixed" else ExitAtStep(4, lm.exit_points[0])
    for token in ids[: kept - len(prompt) + 1]:  # feed the completion back as the gated run did
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        gen.step(torch.tensor([[token]]), attn, pre.cache, replay)
    assert not torch.allclose(full, pre.cache.layers[-1].keys[0, :, kept], atol=1e-3)


def test_full_gate_completion_is_stored_and_reused_exactly(lm):
    prompt = tokens(50, 16)
    store = fresh(lm)
    gen = cached(lm, store)
    [first] = gen.generate([prompt], FullGate(), GREEDY)
    accepted = prompt + first.token_ids + tokens(51, 2)  # the user took the suggestion and typed on
    [again] = gen.generate([accepted], FullGate(), GREEDY)
    assert again.cached_prompt_tokens == len(prompt) + NEW - 1  # the last completion token was never fed back
    assert again.token_ids == cold(lm, [accepted])[0]


def test_kv_mode_none_and_no_cache_leave_the_store_alone(lm):
    store = fresh(lm)
    gen = cached(lm, store)
    [result] = gen.generate([tokens(60, 12)], FullGate(), GenerationConfig(max_new_tokens=3, kv_mode="none"))
    assert result.cached_prompt_tokens == 0 and store.stats().lookups == 0 and store.stats().entries == 0


def test_clear_errors(lm):
    with pytest.raises(ValueError, match="budget_bytes"):
        PrefixCache(-1, "x")
    with pytest.raises(ValueError, match="not of the running model"):
        GatedGenerator(lm, prefix_cache=PrefixCache(10, "some-other-model"))
    with pytest.raises(ValueError, match="at least one token"):
        cached(lm, fresh(lm)).prefill([[1], []], False)
    with pytest.raises(ValueError, match="kv must be"):
        fresh(lm).insert([1, 2, 3], torch.zeros(2, 2, 1, 2, 4))


def test_partitions_never_match_each_other_and_own_repeats_still_hit(lm):
    """Issue 25: tenant B (and tenant A under another cache_salt) sending A's prompt reuses nothing; A's own
    repeat reuses all but its last token; the tokens are the cold ones everywhere."""
    store = fresh(lm)
    a, b, a_salted = Partition("a"), Partition("b"), Partition("a", "project-2")
    prompt = tokens(70, 40)
    gen_a = GatedGenerator(lm).scoped(store.scoped(a))
    gen_a.generate([prompt], FullGate(), GREEDY)
    expected = cold(lm, [prompt])[0]
    for partition in (b, a_salted, Partition()):
        [other] = GatedGenerator(lm).scoped(store.scoped(partition)).generate([prompt], FullGate(), GREEDY)
        assert (other.cached_prompt_tokens, other.token_ids) == (0, expected), partition
    [again] = gen_a.generate([prompt], FullGate(), GREEDY)
    assert (again.cached_prompt_tokens, again.token_ids) == (len(prompt) - 1, expected)
    assert store.longest_prefix(prompt, Partition("b"))[0] == len(prompt)  # b's own copy, stored by its request
    assert store.longest_prefix(prompt, Partition("c")) == (0, None)


def test_a_tenant_over_its_budget_evicts_only_its_own_entries(lm):
    one = lm.num_layers * 2 * 2 * 10 * 16 * 4  # bytes of a 10-token entry

    def insert(store, seed, tenant):
        return store.insert(tokens(seed, 10), torch.randn(lm.num_layers, 2, 2, 10, 16), Partition(tenant))

    store = PrefixCache(4 * one, lm.fingerprint, tenant_budget_bytes=2 * one, max_entries=100)
    assert insert(store, 0, "victim") and insert(store, 1, "victim")
    for seed in range(2, 12):  # the noisy tenant stores ten long prompts
        assert insert(store, seed, "noisy")
        assert store.tenant_bytes("noisy") <= 2 * one
    assert [store.longest_prefix(tokens(s, 10), Partition("victim"))[0] for s in (0, 1)] == [10, 10]
    assert store.tenant_bytes("victim") == 2 * one and store.stats().evictions == 8
    assert not insert(store, 99, "noisy") or store.tenant_bytes("noisy") <= 2 * one


def test_the_entry_cap_holds_per_tenant_and_in_all(lm):
    def insert(store, seed, tenant):
        return store.insert(tokens(seed, 3), torch.zeros(1, 2, 1, 3, 1), Partition(tenant))

    store = PrefixCache(10**9, lm.fingerprint, max_entries=5, tenant_max_entries=3)
    for seed in range(6):
        insert(store, seed, "a")
    assert store.stats().entries == 3
    insert(store, 10, "b"), insert(store, 11, "b"), insert(store, 12, "b")
    assert store.stats().entries == 5  # the cap in all: the least recently used entries went
    assert store.longest_prefix(tokens(12, 3), Partition("b"))[0] == 3


def test_lookups_stay_fast_with_many_entries(lm):
    """The hash-chained index: a lookup costs a few digests, not a scan (the scan took 417 ms at 100k entries)."""
    store = PrefixCache(10**9, lm.fingerprint, max_entries=50_000)
    for seed in range(20_000):
        ids = [seed % 50, *tokens(seed, 40)]  # many entries share their first token
        store.insert(ids, torch.zeros(1, 2, 1, 41, 1), Partition(f"t{seed % 7}"))
    assert store.stats().entries == 20_000
    probe = [123 % 50, *tokens(123, 40)]
    start = time.perf_counter()
    for _ in range(200):
        assert store.longest_prefix(probe + [7, 8], Partition("t4"))[0] == 41
    per_lookup = (time.perf_counter() - start) / 200
    assert per_lookup < 0.005, f"{per_lookup * 1e3:.2f} ms per lookup at 20,000 entries"
    assert store.longest_prefix(probe, Partition("t5"))[0] == 1  # its entries share the first token only
    assert store.longest_prefix(probe, Partition("nobody")) == (0, None)


@pytest.mark.integration
def test_embedded_model_cached_requests_return_the_cold_tokens(embedded):
    """20 held-out stdlib files through the real generator path: after the previous keystroke's
    request, a request served from the prefix cache returns exactly the tokens of a cold request
    (greedy, full gate)."""
    from greencode.config import DataConfig
    from greencode.data import load_corpus

    files = [f for f in load_corpus(DataConfig(corpus="stdlib")).split("test") if len(f.text) > 800][:20]
    assert len(files) == 20
    before = [f.text[:150] for f in files]  # short prompts keep the test at seconds
    typed = [f.text[:153] for f in files]  # three more characters
    cfg = GenerationConfig(max_new_tokens=6)
    gen = GatedGenerator(embedded, prefix_cache=PrefixCache(2**30, embedded.fingerprint))
    gen.generate(before, FullGate(), cfg)
    warm = gen.generate(typed, FullGate(), cfg)
    assert all(r.cached_prompt_tokens > 0 for r in warm)
    cold_results = GatedGenerator(embedded).generate(typed, FullGate(), cfg)
    assert [r.token_ids for r in warm] == [r.token_ids for r in cold_results]
