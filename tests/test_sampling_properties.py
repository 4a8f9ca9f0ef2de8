"""Property-based tests (hypothesis) of the sampling parameters, the warped law and the acceptance rule.

Whatever finite parameters and logits come in (huge, tiny, tied, infinite, NaN), the law is a distribution,
every drawn token has mass, and where the law is degenerate (one token left) sampling is greedy, bit for bit.
Example counts are bounded so the whole file runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from dspark.errors import DsparkError  # noqa: E402
from dspark.runtime.sampling import GREEDY_TEMPERATURE, SamplingParams, accept, probabilities, sample  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_float = st.floats(allow_nan=True, allow_infinity=True)
finite_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.floats(0, 1e-4), st.floats(0, 1e300), st.sampled_from([0.0, 5e-324, 1e-310, 1e-30, 1e-5])),
    top_p=st.one_of(st.floats(1e-300, 1.0), st.just(1.0)),
    top_k=st.integers(0, 12),
)
# logits as a model could (or should not) produce them: any magnitude, ties, and a few non-finite entries
logit_values = st.one_of(st.floats(-1e308, 1e308), st.sampled_from([0.0, 1.0, -np.inf, np.inf, np.nan]))


def logit_rows(rows: int):
    return st.integers(2, 10).flatmap(lambda v: arrays(np.float64, (rows, v), elements=logit_values))


class Uniforms:
    """The part of ``np.random.Generator`` that ``accept`` uses, fed from hypothesis (edges 0 and 1-ulp included)."""

    def __init__(self, data):
        self.data = data

    def random(self):
        return self.data.draw(st.one_of(st.floats(0, 1, exclude_max=True), st.just(math.nextafter(1.0, 0))))


@FAST
@given(temperature=any_float, top_p=any_float, top_k=st.integers(-3, 3))
def test_parameters_are_accepted_exactly_when_finite_and_in_range(temperature, top_p, top_k):
    valid = math.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1 and top_k >= 0
    if not valid:
        with pytest.raises(DsparkError) as e:
            SamplingParams(temperature, top_p, top_k)
        assert e.value.param in ("temperature", "top_p", "top_k")
        return
    params = SamplingParams(temperature, top_p, top_k)
    assert params.greedy == (temperature < GREEDY_TEMPERATURE)
    assert params.temperature == (0.0 if params.greedy else temperature)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NaN/inf logits are handled, not warned about
@FAST
@given(params=finite_params, logits=logit_rows(3))
def test_the_warped_law_is_always_a_distribution(params, logits):
    p = probabilities(logits, params)
    assert p.shape == logits.shape
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-9)
    for row_logits, row_p in zip(logits, p):
        if (row_logits > -np.inf).any():  # a NaN logit counts as -inf: no mass while another token has some
            assert (row_p[np.isnan(row_logits)] == 0).all()


@FAST
@given(probs=st.integers(1, 10).flatmap(lambda v: arrays(np.float64, v, elements=st.floats(0, 1e300))).filter(
    lambda p: p.sum() > 0 and np.isfinite(p.sum())), u=st.floats(0, 1, exclude_max=True))
def test_a_draw_always_has_mass(probs, u):
    token = sample(probs, u)
    assert 0 <= token < len(probs) and probs[token] > 0


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NaN/inf logits are handled, not warned about
@FAST
@given(data=st.data(), params=finite_params, n_draft=st.integers(0, 4))
def test_acceptance_returns_valid_tokens_for_any_input(data, params, n_draft):
    logits = data.draw(logit_rows(n_draft + 1))
    vocab = logits.shape[1]
    drafts = data.draw(st.lists(st.integers(0, vocab - 1), min_size=n_draft, max_size=n_draft))
    q = data.draw(arrays(np.float64, (n_draft, vocab), elements=st.one_of(st.floats(0, 1), st.just(np.nan))))
    accepted, token = accept(logits, drafts, None if params.greedy else q, params, Uniforms(data))
    assert 0 <= accepted <= n_draft and 0 <= token < vocab
    if not params.greedy:
        # the emitted token has mass under the target's warped law at its position
        assert probabilities(logits, params)[accepted, token] > 0


@FAST
@given(data=st.data(), n_draft=st.integers(0, 4), vocab=st.integers(2, 10),
       params=st.one_of(
           # a temperature so small that every non-maximal token underflows to probability 0 (margin >= 1)
           st.builds(SamplingParams, temperature=st.floats(GREEDY_TEMPERATURE, 1e-3), top_p=st.floats(0.01, 1.0),
                     top_k=st.integers(0, 12)),
           st.builds(SamplingParams, temperature=st.floats(1e-3, 100.0), top_k=st.just(1)),
           st.builds(SamplingParams, temperature=st.floats(0, 1e-5, exclude_max=True))))
def test_a_degenerate_law_accepts_exactly_like_greedy(data, n_draft, vocab, params):
    # rows with one clear maximum (the others at least 1 below it)
    rows = []
    for _ in range(n_draft + 1):
        row = np.array(data.draw(st.lists(st.floats(-1e6, 1e6), min_size=vocab, max_size=vocab)))
        best = data.draw(st.integers(0, vocab - 1))
        row[best] = row.max() + data.draw(st.floats(1.0, 1e6))
        rows.append(row)
    logits = np.stack(rows)
    greedy_choice = logits.argmax(axis=-1)
    # drafts that follow the target for a while, then may diverge
    drafts = [int(t) if data.draw(st.booleans()) else data.draw(st.integers(0, vocab - 1)) for t in greedy_choice[:n_draft]]
    q = data.draw(arrays(np.float64, (n_draft, vocab), elements=st.floats(0, 1)))
    expected = accept(logits, drafts, None, SamplingParams(0.0), Uniforms(data))
    assert accept(logits, drafts, None if params.greedy else q, params, Uniforms(data)) == expected
