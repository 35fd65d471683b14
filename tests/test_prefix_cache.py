"""Prefix cache: exact reuse of full-depth prompt K/V, LRU within a byte budget, thread safety."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import make_tiny
from greencode.config import GenerationConfig
from greencode.gates import FixedGate, FullGate, Gate
from greencode.generate import GatedGenerator
from greencode.prefix_cache import PrefixCache, full_depth_tokens, prefill_with_cache, remember

NEW = 8


@pytest.fixture(scope="module", params=["llama", "opt"])
def gen(request):
    return GatedGenerator(make_tiny(request.param, vocab_size=4096))


def tokens(seed, n):
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fresh(gen, budget=10**9):
    return PrefixCache(budget, gen.lm.fingerprint)


def decode(gen, pre, gate=None, n=NEW):
    """Greedy tokens (and layers per token) from a prefill, through the generator's own step."""
    attn, cache, out = pre.attention_mask, pre.cache, pre.output
    ids, layers = [out.logits.argmax(-1)], [out.exit_layers]
    for _ in range(n - 1):
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = gen.step(ids[-1][:, None], attn, cache, gate or FullGate())
        ids.append(out.logits.argmax(-1))
        layers.append(out.exit_layers)
    return torch.stack(ids, 1).tolist(), torch.stack(layers, 1).tolist(), attn


def cold(gen, prompts, n=NEW):
    return [r.token_ids for r in gen.generate(prompts, FullGate(), GenerationConfig(max_new_tokens=n))]


def test_reused_prefix_gives_the_cold_tokens(gen):
    base = tokens(0, 48)
    store = fresh(gen)
    prefill_with_cache(gen, store, [base[:40]])  # a cold pass stores the prompt
    prompt = base[:40] + tokens(1, 5)  # the next keystroke: same start, a few new tokens
    warm = prefill_with_cache(gen, store, [prompt])
    assert warm.reused == [40]
    assert decode(gen, warm)[0] == cold(gen, [prompt])
    reference = gen.step(warm.input_ids, warm.attention_mask, None, FullGate()).logits  # no cache at all
    torch.testing.assert_close(warm.output.logits, reference, rtol=0, atol=1e-4)


def test_batch_rows_reuse_different_prefix_lengths(gen):
    a, b = tokens(2, 40), tokens(3, 30)
    store = fresh(gen)
    prefill_with_cache(gen, store, [a, b])
    prompts = [a + tokens(4, 3), b[:20] + tokens(5, 6), tokens(6, 4), a]
    warm = prefill_with_cache(gen, store, prompts)
    # The rows run their last S = 6 positions together (b's row has 6 new tokens): a row with a
    # shorter remainder recomputes a few more of its own tokens, the unmatched 4-token row is
    # left-padded among them, and a prompt equal to a stored one still recomputes its last token.
    assert warm.reused == [37, 20, 0, 34]
    assert decode(gen, warm)[0] == cold(gen, prompts)
    stats = store.stats()
    assert (stats.lookups, stats.hits, stats.reused_tokens) == (6, 3, 37 + 20 + 34)
    assert stats.prompt_tokens == 40 + 30 + 43 + 26 + 4 + 40


def entry_bytes(gen, n):
    probe = fresh(gen)
    prefill_with_cache(gen, probe, [tokens(999, n)])
    return probe.stats().bytes_held


def test_concurrent_requests_share_the_cache_exactly(gen):
    base = tokens(7, 36)
    store = fresh(gen, budget=3 * entry_bytes(gen, 36))  # room for about three prompts: evictions too
    prompts = [base[: 20 + 2 * i] + tokens(100 + i, 1 + i % 3) for i in range(8)]
    expected = cold(gen, prompts)
    barrier = threading.Barrier(4)

    def request(i):
        if i < 4:
            barrier.wait()  # the first four start together
        return decode(gen, prefill_with_cache(gen, store, [prompts[i]]))[0][0]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(request, range(8)))
    assert got == expected
    stats = store.stats()
    assert stats.hits > 0 and stats.bytes_held <= stats.budget_bytes


def test_entries_are_never_changed_by_the_requests_that_reuse_them(gen):
    store = fresh(gen)
    base = tokens(8, 30)
    prefill_with_cache(gen, store, [base])
    snapshot = store.longest_prefix(base)[1].clone()
    warm = prefill_with_cache(gen, store, [base + tokens(9, 2)], store_prompts=False)
    for layer in warm.cache.layers:  # even code that writes the request's cache in place
        layer.keys.zero_()
        layer.values.fill_(float("nan"))
    assert torch.equal(store.longest_prefix(base)[1], snapshot)
    warm = prefill_with_cache(gen, store, [base + tokens(10, 3)], store_prompts=False)
    decode(gen, warm)  # update() on every layer
    warm.cache.crop(-3)
    assert torch.equal(store.longest_prefix(base)[1], snapshot)


def test_budget_is_never_exceeded_and_lru_entries_go_first(gen):
    lm = gen.lm
    sizes = {}

    def insert(store, seed, n):
        kv = torch.randn(lm.num_layers, 2, 2, n, 16)
        sizes[seed] = kv.numel() * 4
        return store.insert(tokens(seed, n), kv)

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


def test_prefill_fills_the_cache_past_its_budget(gen):
    prompts = [tokens(20 + i, 24) for i in range(6)]
    store = fresh(gen, budget=2 * entry_bytes(gen, 24))
    for p in prompts:
        prefill_with_cache(gen, store, [p])
        assert store.stats().bytes_held <= store.budget_bytes
    assert store.stats().entries == 2 and store.stats().evictions == 4


def test_covered_and_extended_sequences_are_stored_once(gen):
    store = fresh(gen)
    base = tokens(30, 20)
    prefill_with_cache(gen, store, [base[:10]])
    prefill_with_cache(gen, store, [base])  # extends the first: replaces it
    prefill_with_cache(gen, store, [base[:15]])  # covered by the second: nothing new
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

    def exit_mask(self, hidden, layer, decode):
        self.calls += 1  # one decision layer: one call per step
        return torch.full((hidden.shape[0],), self.calls == self.k, dtype=torch.bool), None


@pytest.mark.parametrize("gate_name", ["fixed", "mixed"])
def test_propagated_kv_is_never_stored(gen, gate_name):
    lm = gen.lm
    gate = FixedGate(4) if gate_name == "fixed" else ExitAtStep(4, lm.exit_points[0])
    prompt = tokens(40, 20)
    store = fresh(gen)
    pre = prefill_with_cache(gen, store, [prompt])
    ids, layers, attn = decode(gen, pre, gate, n=10)
    keep = full_depth_tokens(prompt, ids[0], layers[0], lm.num_layers)
    remember(store, pre.cache, attn, [keep])
    first_exit = 1 if gate_name == "fixed" else 4  # index of the first token an exited step produced
    assert layers[0][first_exit] < lm.num_layers and set(layers[0][:first_exit]) == {lm.num_layers}
    assert len(keep) == len(prompt) + first_exit - 1
    assert store.longest_prefix(prompt + ids[0])[0] == len(keep)
    # what was left out really differs from the full model's K/V: storing it would not be exact
    full = prefill_with_cache(gen, fresh(gen), [prompt + ids[0]]).cache.layers[-1].keys[0, :, len(keep)]
    ours = pre.cache.layers[-1].keys[0, :, len(keep)]
    assert not torch.allclose(full, ours, atol=1e-3)


def test_full_gate_completion_is_stored_and_reused_exactly(gen):
    lm = gen.lm
    prompt = tokens(50, 16)
    store = fresh(gen)
    pre = prefill_with_cache(gen, store, [prompt])
    ids, layers, attn = decode(gen, pre)
    remember(store, pre.cache, attn, [full_depth_tokens(prompt, ids[0], layers[0], lm.num_layers)])
    accepted = prompt + ids[0] + tokens(51, 2)  # the user took the suggestion and typed on
    warm = prefill_with_cache(gen, store, [accepted])
    assert warm.reused == [len(prompt) + NEW - 1]
    assert decode(gen, warm)[0] == cold(gen, [accepted])


def test_clear_errors(gen):
    with pytest.raises(ValueError, match="budget_bytes"):
        PrefixCache(-1, "x")
    with pytest.raises(ValueError, match="another model|not of the running model"):
        prefill_with_cache(gen, PrefixCache(10, "some-other-model"), [[1, 2]])
    with pytest.raises(ValueError, match="at least one token"):
        prefill_with_cache(gen, fresh(gen), [[1], []])
    with pytest.raises(ValueError, match="kv must be"):
        fresh(gen).insert([1, 2, 3], torch.zeros(2, 2, 1, 2, 4))


@pytest.mark.integration
def test_embedded_model_typing_session_is_exact(embedded):
    """20 held-out stdlib files: a request served from the cache gives the cold request's tokens."""
    from greencode.config import DataConfig
    from greencode.data import load_corpus

    gen = GatedGenerator(embedded)
    tok = embedded.tokenizer
    files = [f for f in load_corpus(DataConfig(corpus="stdlib")).split("test") if len(f.text) > 800][:20]
    assert len(files) == 20
    before = [tok(f.text[:150])["input_ids"] for f in files]  # short prompts keep the test at seconds
    typed = [tok(f.text[:153])["input_ids"] for f in files]  # three more characters
    store = PrefixCache(2**30, embedded.fingerprint)
    prefill_with_cache(gen, store, before)
    warm = prefill_with_cache(gen, store, typed)
    assert all(r > 0 for r in warm.reused)
    assert decode(gen, warm, n=6)[0] == cold(gen, typed, n=6)
