from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chi2_contingency

from maskgit_jax.decoding import core as decoding
from maskgit_jax.decoding import mask_schedule, orders
from maskgit_jax.decoding.logits import CodebookLogits
from maskgit_jax.decoding.options import DecodeOptions

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared/reference/fixtures"
TOY_FILE = FIXTURES / "official_decode_toy_gen.npz"
SETTING = "gen_T8_t4.5"

# Family-wise false-alarm rate of the 31 homogeneity tests (Bonferroni): a faithful decoder
# fails with probability about 1e-3, while the pitfalls below give p-values far under 1e-10.
FAMILY_ALPHA = 1e-3


def decode(
    inputs,
    rng,
    tokens_to_logits,
    params=None,
    *,
    mask_token_id,
    order_score=None,
    return_all_steps=False,
    **option_fields,
):
    """`decoding.decode` with the option fields given as keywords (validated by DecodeOptions)."""
    return decoding.decode(
        inputs,
        rng,
        tokens_to_logits,
        params,
        mask_token_id=mask_token_id,
        options=DecodeOptions(**option_fields),
        order_score=order_score,
        return_all_steps=return_all_steps,
    )


# ---------------------------------------------------------------------------------------------
# The fixture's toy model and homogeneity statistics.


def chain_toy(base, ids):
    """The fixture's toy: logits[b, i, v] = BASE[i, v] + 2 [v == ids[b, i-1]] for known codes."""
    vocab = base.shape[-1]
    left = ids[:, :-1]
    bonus = (left[..., None] == jnp.arange(vocab)).astype(jnp.float32)  # False for -1 and class.
    bonus = jnp.concatenate([jnp.zeros_like(bonus[:, :1]), bonus], axis=1)
    return base[None] + 2.0 * bonus


@pytest.fixture(scope="module")
def toy():
    if not TOY_FILE.exists():
        pytest.skip(f"reference fixture {TOY_FILE} is absent (only present in this workplace)")
    data = np.load(TOY_FILE)
    num_steps, choice_temperature, start = (float(x) for x in data[f"{SETTING}__meta"])
    final = data[f"{SETTING}__final"]
    length = int(data["L"])
    if final.shape[1] == length + 1:  # README layout: class token first.
        final = final[:, 1:]
    assert final.shape[1] == length
    return dict(
        base=jnp.asarray(data["BASE"], jnp.float32),
        vocab=int(data["V"]),
        init=data[f"{SETTING}__init"].astype(np.int32),
        final=final,
        num_steps=int(num_steps),
        choice_temperature=choice_temperature,
        start=int(start),
    )


def run_toy(toy, key_seeds, batch, **overrides):
    kwargs = dict(
        mask_token_id=-1,
        num_steps=toy["num_steps"],
        start_step=toy["start"],
        choice_temperature=toy["choice_temperature"],
        schedule="cosine",
    )
    kwargs.update(overrides)
    inputs = np.tile(toy["init"], (batch, 1))
    outs = [
        np.asarray(decode(inputs, jax.random.PRNGKey(s), chain_toy, toy["base"], **kwargs))
        for s in key_seeds
    ]
    out = np.concatenate(outs)
    assert np.all(out[:, 0] == toy["init"][0]), "class token must be kept"
    return out[:, 1:]


def homogeneity_p(counts_a, counts_b):
    """Chi-square test of homogeneity on a 2 x K table, pooling cells with expected count < 5."""
    table = np.stack([counts_a, counts_b]).astype(np.float64)
    table = table[:, table.sum(0) > 0]
    rare = table.sum(0) / 2 < 5
    if rare.any():
        table = np.concatenate([table[:, ~rare], table[:, rare].sum(1, keepdims=True)], axis=1)
    if table.shape[1] < 2:
        return 1.0
    return chi2_contingency(table)[1]


def all_p_values(a, b, vocab):
    """16 per-position tests and 15 adjacent-pair tests (vocab^2 categories each)."""
    ps = [
        homogeneity_p(np.bincount(a[:, i], minlength=vocab), np.bincount(b[:, i], minlength=vocab))
        for i in range(a.shape[1])
    ]
    for i in range(a.shape[1] - 1):
        pa = np.bincount(a[:, i] * vocab + a[:, i + 1], minlength=vocab * vocab)
        pb = np.bincount(b[:, i] * vocab + b[:, i + 1], minlength=vocab * vocab)
        ps.append(homogeneity_p(pa, pb))
    return np.array(ps)


def same_distribution(samples, toy):
    ps = all_p_values(samples, toy["final"], toy["vocab"])
    assert len(ps) == 31
    return ps.min() >= FAMILY_ALPHA / len(ps), ps.min()


# ---------------------------------------------------------------------------------------------
# Fixture comparisons.


def test_matches_authors_decoder_statistically(toy):
    samples = run_toy(toy, key_seeds=range(2000, 2008), batch=500)
    assert samples.shape == toy["final"].shape
    ok, min_p = same_distribution(samples, toy)
    assert ok, f"decoded distribution differs from the authors' (min p = {min_p:.3g})"


@pytest.mark.parametrize(
    "pitfall",
    [
        dict(choice_temperature=0.0),  # No annealed noise: greedy re-masking.
        dict(choice_temperature=2.0),  # Wrong noise scale.
        dict(temperature=1.25),  # Sampling temperature not 1.
    ],
)
def test_negative_control_statistics_have_power(toy, pitfall):
    samples = run_toy(toy, key_seeds=range(2000, 2008), batch=500, **pitfall)
    ok, min_p = same_distribution(samples, toy)
    assert not ok, f"the homogeneity tests failed to reject {pitfall} (min p = {min_p:.3g})"
    assert min_p < 1e-8


def test_bit_exact_with_fixture_keys(toy):
    # The fixture used PRNGKey(1000 + s) for 8 batches of 500. Because the key is split exactly
    # as in the authors' sampler, the same keys reproduce its samples bit for bit (with jax's
    # default threefry PRNG; a change of PRNG implementation would break only this test).
    samples = run_toy(toy, key_seeds=range(1000, 1008), batch=500)
    np.testing.assert_array_equal(samples, toy["final"])


# ---------------------------------------------------------------------------------------------
# Invariants on small toys.

VOCAB = 8
LENGTH = 17  # Class token + 16 image tokens.
CLASS_ID = VOCAB + 3


def random_toy(params, ids):
    """Chain toy with random per-position logits (params [LENGTH, VOCAB])."""
    return chain_toy(params, ids)


def count_toy(params, ids):
    """Every position samples (almost surely) the number of mask tokens in its row."""
    del params
    count = jnp.sum(ids == COUNT_MASK, axis=-1)
    logits = 40.0 * jax.nn.one_hot(count, LENGTH + 1)
    return jnp.broadcast_to(logits[:, None, :], (*ids.shape, LENGTH + 1))


COUNT_MASK = 1000  # A positive mask id outside the vocabulary.


def editing_inputs(seed, batch, mask_id, known_fracs=(0.0, 0.5, 0.9, 1.0)):
    """Rows with a class token and different numbers of known tokens (editing)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, VOCAB, size=(batch, LENGTH)).astype(np.int32)
    ids[:, 0] = CLASS_ID
    for b in range(batch):
        frac = known_fracs[b % len(known_fracs)]
        unknown = rs.permutation(LENGTH - 1)[: int(round((1 - frac) * (LENGTH - 1)))] + 1
        ids[b, unknown] = mask_id
    ids[-1, 1:] = mask_id  # At least one fully masked row.
    if batch > 2:
        ids[-2, 1:] = rs.randint(0, VOCAB, size=LENGTH - 1)  # A row with nothing to decode.
        ids[-3, 1:] = rs.randint(0, VOCAB, size=LENGTH - 1)
        ids[-3, 5] = mask_id  # A row with a single unknown token.
    return ids


def random_params(seed):
    return jax.random.normal(jax.random.PRNGKey(seed), (LENGTH, VOCAB))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("ordering", ["confidence", "halton"])
def test_known_kept_and_no_mask_left(seed, temperature, ordering):
    mask_id = -1
    inputs = editing_inputs(seed, 12, mask_id)
    out = np.asarray(
        decode(
            inputs,
            jax.random.PRNGKey(seed),
            random_toy,
            random_params(seed),
            mask_token_id=mask_id,
            num_steps=6,
            temperature=temperature,
            ordering=ordering,
            order_score=HALTON_SCORE if ordering == "halton" else None,
        )
    )
    assert out.dtype == np.int32 and out.shape == inputs.shape
    known = inputs != mask_id
    np.testing.assert_array_equal(out[known], inputs[known])
    assert not np.any(out == mask_id)
    assert np.all((out[~known] >= 0) & (out[~known] < VOCAB))


def expected_mask_counts(n0, num_steps, start_step, method):
    """Masked tokens before each step by the authors' formula, per row: [B, num_steps]."""
    counts = np.zeros((len(n0), num_steps), np.int64)
    current = n0.copy()
    for t in range(start_step, num_steps):
        counts[:, t] = current
        ratio = np.float32(t + 1) / np.float32(num_steps)
        gamma = np.asarray(mask_schedule.schedule(ratio, n0, method))
        mask_len = np.floor(n0 * gamma).astype(np.int64)
        mask_len = np.maximum(1, np.minimum(current - 1, mask_len))
        current = np.where(current == 0, 0, mask_len)  # Nothing to re-mask in a complete row.
    return counts


class CountTransformer:
    """Stands in for the transformer module in `CodebookLogits`: `count_toy` logits."""

    dtype = jnp.float32

    def apply(self, variables, ids, num_logits):
        del variables
        return count_toy(None, ids)[..., :num_logits]


COUNT_LOGITS = {
    (guided, top_k): CodebookLogits(CountTransformer(), LENGTH + 1, COUNT_MASK, top_k, guided)
    for guided in (False, True)
    for top_k in (None, 3)
}
HALTON_SCORE = orders.order_score(orders.halton_order(4, 4))


@pytest.mark.parametrize(
    "method,num_steps,start_step",
    [("cosine", 8, 0), ("cosine", 12, 2), ("exp", 7, 1)],
)
@pytest.mark.parametrize("ordering", ["confidence", "halton"])
@pytest.mark.parametrize("guided,top_k", [(False, None), (True, 3)])
def test_mask_counts_follow_schedule(method, num_steps, start_step, ordering, guided, top_k):
    inputs = editing_inputs(3, 10, COUNT_MASK)
    # Known tokens moved above every possible count so that they cannot be confused with one.
    inputs = np.where(inputs != COUNT_MASK, inputs + 100, inputs)
    n0 = np.sum(inputs == COUNT_MASK, axis=-1)
    assert len(set(n0.tolist())) >= 4  # Rows really differ.
    final, steps = decode(
        inputs,
        jax.random.PRNGKey(7),
        COUNT_LOGITS[guided, top_k],
        (None, jnp.float32(1.5)),
        mask_token_id=COUNT_MASK,
        num_steps=num_steps,
        start_step=start_step,
        schedule=method,
        ordering=ordering,
        order_score=HALTON_SCORE if ordering == "halton" else None,
        return_all_steps=True,
    )
    final, steps = np.asarray(final), np.asarray(steps)
    assert steps.shape == (inputs.shape[0], num_steps, LENGTH)
    np.testing.assert_array_equal(steps[:, -1], final)
    # Steps that were not run hold the inputs.
    np.testing.assert_array_equal(steps[:, :start_step], np.repeat(inputs[:, None], start_step, 1))
    expected = expected_mask_counts(n0, num_steps, start_step, method)
    for t in range(start_step, num_steps):
        for b in range(inputs.shape[0]):
            c = expected[b, t]
            sampled_now = np.sum(steps[b, t] == c) if c > 0 else 0
            assert sampled_now == c, (b, t, c, steps[b, t])
    known = inputs != COUNT_MASK
    np.testing.assert_array_equal(final[known], inputs[known])
    assert not np.any(final == COUNT_MASK)


def test_halton_reveals_positions_in_its_order():
    # Fully masked rows: after each step, the revealed positions are a prefix of the order.
    inputs = np.full((3, LENGTH), -1, np.int32)
    inputs[:, 0] = CLASS_ID
    _, steps = decode(
        inputs,
        jax.random.PRNGKey(0),
        random_toy,
        random_params(0),
        mask_token_id=-1,
        num_steps=6,
        ordering="halton",
        order_score=HALTON_SCORE,
        return_all_steps=True,
    )
    order = orders.halton_order(4, 4) + 1
    n0 = np.full(3, LENGTH - 1)
    counts = expected_mask_counts(n0, 6, 0, "cosine")
    for t in range(5):
        kept = LENGTH - 1 - counts[0, t + 1]  # Revealed after step t.
        # Tokens sampled at step t+1 at the revealed positions equal step t's.
        np.testing.assert_array_equal(
            np.asarray(steps)[:, t + 1, order[:kept]], np.asarray(steps)[:, t, order[:kept]]
        )


def test_per_row_keys_make_rows_independent_of_the_batch():
    inputs = editing_inputs(5, 6, -1)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(6))
    whole = np.asarray(
        decode(inputs, keys, random_toy, random_params(2), mask_token_id=-1, num_steps=5)
    )
    halves = [
        np.asarray(
            decode(
                inputs[i : i + 3],
                keys[i : i + 3],
                random_toy,
                random_params(2),
                mask_token_id=-1,
                num_steps=5,
            )
        )
        for i in (0, 3)
    ]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    with pytest.raises(ValueError, match="one per row"):
        decode(inputs, keys[:5], random_toy, random_params(2), mask_token_id=-1, num_steps=5)


def test_deterministic_given_key_and_key_matters():
    inputs = editing_inputs(0, 12, -1, known_fracs=(0.0,))
    params = random_params(0)

    def run(seed):
        return np.asarray(
            decode(
                inputs, jax.random.PRNGKey(seed), random_toy, params, mask_token_id=-1, num_steps=6
            )
        )

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_start_step_runs_remaining_steps():
    inputs = editing_inputs(4, 8, -1, known_fracs=(0.5,))
    out, steps = decode(
        inputs,
        jax.random.PRNGKey(0),
        random_toy,
        random_params(1),
        mask_token_id=-1,
        num_steps=12,
        start_step=11,
        return_all_steps=True,
    )
    out, steps = np.asarray(out), np.asarray(steps)
    # A single step samples every unknown token at once.
    known = inputs != -1
    np.testing.assert_array_equal(out[known], inputs[known])
    assert not np.any(out == -1)
    np.testing.assert_array_equal(steps[:, :11], np.repeat(inputs[:, None], 11, 1))


class TraceCounter:
    """A stable tokens_to_logits that counts how often jax traces it."""

    def __init__(self):
        self.traces = 0

    def __call__(self, params, ids):
        self.traces += 1
        return chain_toy(params, ids)


COUNTER = TraceCounter()


def test_second_call_does_not_recompile():
    kwargs = dict(mask_token_id=-1, num_steps=5)
    a = editing_inputs(0, 6, -1)
    b = editing_inputs(1, 6, -1)
    out_a = decode(a, jax.random.PRNGKey(0), COUNTER, random_params(0), **kwargs)
    traces, programs = COUNTER.traces, decoding.cache_size()
    assert traces == 1
    out_b = decode(
        b,
        jax.random.PRNGKey(1),
        COUNTER,
        random_params(1),
        choice_temperature=3.0,
        temperature=0.7,
        **kwargs,
    )
    assert COUNTER.traces == traces, "second call with the same shapes retraced"
    assert decoding.cache_size() == programs, "second call with the same shapes recompiled"
    assert not np.array_equal(np.asarray(out_a), np.asarray(out_b))


@pytest.mark.parametrize(
    "inputs,overrides,match",
    [
        (None, dict(num_steps=0), "num_steps"),
        (None, dict(num_steps=2.0), "num_steps"),
        (None, dict(start_step=-1), "start_step"),
        (None, dict(start_step=4), "start_step"),
        (np.zeros((LENGTH,), np.int32), {}, "2-D integer"),
        (np.zeros((2, 3, LENGTH), np.int32), {}, "2-D integer"),
        (np.zeros((2, LENGTH), np.float32), {}, "2-D integer"),
        (None, dict(temperature=0.0), "temperature"),
        (None, dict(temperature=-1.0), "temperature"),
        (None, dict(choice_temperature=-1.0), "choice_temperature"),
        (None, dict(schedule="cosinus"), "valid: cosine"),
        (None, dict(choice_temperature=float("nan")), "choice_temperature"),
        (None, dict(ordering="raster"), "ordering"),
        (None, dict(ordering="halton"), "needs an order_score"),
        (None, dict(top_k=0), "top_k"),
        (None, dict(guidance_scale=-1.0), "guidance_scale"),
        (None, dict(dtype="float16"), "dtype"),
    ],
)
def test_invalid_arguments_raise_before_tracing(inputs, overrides, match):
    counter = TraceCounter()
    if inputs is None:
        inputs = editing_inputs(0, 2, -1)
    kwargs = dict(mask_token_id=-1, num_steps=4)
    kwargs.update(overrides)
    programs = decoding.cache_size()
    with pytest.raises(ValueError, match=match):
        decode(inputs, jax.random.PRNGKey(0), counter, random_params(0), **kwargs)
    assert counter.traces == 0
    assert decoding.cache_size() == programs
