"""Verify-length schedulers, calibration and continuous batching: lengths change, outputs never do."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest

from conftest import (assert_speculative_equals_plain, cheap_verify, dear_drafts_from_two_rows, made_up_profile,
                      steep_from_two_rows)
from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.calibration import GRID, calibrate_bundle, ece, fit_sts
from dspark.runtime.generate import Generator, Request, Sequence
from dspark.runtime.kv import KVCache, fill_order
from dspark.runtime.profile import cost_probe, profile_bundle
from dspark.runtime.sampling import SamplingParams, accept
from dspark.runtime.schedulers import (CALIBRATION_FILE, SpsScheduler, StepsPerSecond, load_calibration,
                                       make_block_schedule, profile_key, sps_lengths)

PROMPTS = [[5, 6, 7, 8, 9], [3] * 40, [11, 12], list(range(1, 60)), [7, 7, 2], [9] * 13, [4, 8, 15, 16, 23, 42], [1]]


def appendix_a_first_token(early_stop: bool, trials: int, seed: int = 0) -> float:
    """Paper Appendix A: P(first output token = A) under the sps scheduler with or without the early stop."""
    rng = np.random.default_rng(seed)
    table = StepsPerSecond(rows=[1], widths=[1, 2, 3], steps_per_second=[[1.0, 0.5, 0.45]])
    p_target = np.log(np.array([[0.7, 0.3], [0.5, 0.5], [0.5, 0.5]]))
    q = np.array([0.5, 0.5])
    params = SamplingParams(temperature=1.0)
    hits = 0
    for _ in range(trials):
        drafts = [int(rng.random() < 0.5), int(rng.random() < 0.5)]  # token 0 is A
        c2 = 0.9 if drafts[0] == 0 else 0.0  # the Markov confidence of position 2 reads the sampled x1
        length = sps_lengths([np.array([0.8, c2])], [2], table, early_stop)[0]
        n, token = accept(p_target, drafts[:length], np.stack([q, q])[:length], params, rng)
        first = drafts[0] if n >= 1 else token
        hits += first == 0
    return hits / trials


def test_appendix_a_early_stop_is_lossless_and_global_search_is_not():
    trials = 20000
    sigma = (0.7 * 0.3 / trials) ** 0.5
    with_stop = appendix_a_first_token(True, trials)
    without = appendix_a_first_token(False, trials)
    assert abs(with_stop - 0.7) < 4 * sigma, with_stop
    assert abs(without - 0.85) < 4 * (0.85 * 0.15 / trials) ** 0.5, without
    assert without - 0.7 > 20 * sigma


def test_sps_admits_by_survival_and_stops_at_first_drop():
    flat = StepsPerSecond(rows=[1, 2], widths=[1, 8], steps_per_second=[[10.0, 10.0], [10.0, 10.0]])
    # free verification: everything with positive survival is admitted
    assert sps_lengths([np.array([0.9, 0.8, 0.5]), np.array([0.3, 0.9])], [3, 2], flat) == [3, 2]
    steep = StepsPerSecond(rows=[1, 2], widths=[1, 2, 3], steps_per_second=[[10, 5, 3], [10, 5, 3]])
    # any extra width halves throughput: nothing pays
    assert sps_lengths([np.array([0.9, 0.9]), np.array([0.9])], [2, 1], steep) == [0, 0]
    # width 3 would pay (4.83 x 4.4 = 21.2 against 3.8 x 5.5 = 20.9) but width 2 does not (4.34 x 4.5 = 19.5): the
    # search stops there, and goes on to width 3 only without the early stop (which reads c_3, set by draft 2)
    dip = StepsPerSecond(rows=[2], widths=[1, 2, 3, 4], steps_per_second=[[10.0, 5.5, 4.5, 4.4]])
    drafts = [np.array([0.9, 0.6, 0.9]), np.array([0.9, 0.0, 0.0])]
    assert sps_lengths(drafts, [3, 3], dip) == [1, 1] and sps_lengths(drafts, [3, 3], dip, early_stop=False) == [3, 3]


def test_sps_admits_a_width_for_every_row_at_once():
    """A padded verify costs its width whatever each row verifies within it: one row's sure draft does not pay for
    a 2-token call over 4 rows (5 x 8 < 4 x 10.5), but every row's 0.7 does (6.8 x 8 > 42), and so do the rows'
    second positions (8.13 x 7 > 54.4); a row with a weak draft is verified as far as the others, for nothing."""
    table = StepsPerSecond(rows=[4], widths=[1, 2, 3, 4], steps_per_second=[[10.5, 8.0, 7.0, 4.0]])
    drafts = [np.array([0.7, 0.6, 0.9])] * 3 + [np.array([0.7, 0.1, 0.9])]
    assert sps_lengths(drafts, [3, 3, 3, 3], table) == [2, 2, 2, 2]
    assert sps_lengths([np.ones(3), np.zeros(3), np.zeros(3), np.zeros(3)], [3, 3, 3, 3], table) == [0, 0, 0, 0]
    assert sps_lengths(drafts[:1] + [np.zeros(0)] * 3, [3, 0, 0, 0], table) == [0, 0, 0, 0]


def test_sps_drafts_only_where_every_rows_sure_first_draft_pays():
    table = StepsPerSecond(rows=[1, 2, 4], widths=[1, 2], steps_per_second=[[10.0, 9.0], [10.0, 5.0], [10.0, 5.5]])
    sps = SpsScheduler(table)
    assert [sps.should_draft(rows) for rows in (1, 2, 4)] == [True, False, True]
    # where it says no, no confidences make sps verify anything: every row's sure draft, 2 x 2 x 5, does not beat 2 x 10
    assert sps_lengths([np.ones(2) - 1e-12, np.ones(2) - 1e-12], [2, 2], table) == [0, 0]
    assert sps_lengths([np.array([0.3])], [1], table) == [1]  # 1.3 x 9 > 10
    assert SpsScheduler(None).should_draft(2) and SpsScheduler(table, early_stop=False).should_draft(2)


def test_sps_drafts_only_where_the_expected_width_pays_for_the_draft_call():
    """With the drafter's cost profiled, a round drafts where the width sps would choose for rows of the mean
    survival seen so far gains more than the draft round and the wider call cost together."""
    table = StepsPerSecond(rows=[1, 4], widths=[1, 2, 3], steps_per_second=[[100.0, 95.0, 90.0], [50.0, 42.0, 36.0]],
                           draft_seconds=[0.001, 0.012])
    assert table.draft_cost(1) == 0.001 and table.draft_cost(8) == 0.024  # beyond the table: in proportion
    assert abs(table.draft_cost(2) - (0.001 + 0.011 / 3)) < 1e-15
    sps = SpsScheduler(table)
    assert sps.should_draft(4)  # nothing seen yet
    sps.choose([np.array([0.6, 0.5])] * 4, [2] * 4)  # mean survival 0.6, 0.3: width 2 (7.6 x 36 > 6.4 x 42 > 4 x 50)
    # 4 rows: 7.6 tokens in 12 ms + 1/36 s = 191 tokens/s against 200 plain; 1 row: 1.9 in 1 + 11.1 ms = 157 against 100
    assert not sps.should_draft(4) and sps.should_draft(1)
    unpriced = SpsScheduler(StepsPerSecond(table.rows, table.widths, table.steps_per_second))
    unpriced.choose([np.array([0.6, 0.5])] * 4, [2] * 4)
    assert unpriced.should_draft(4)  # a profile without the drafter's cost: verify calls alone decide
    never = SpsScheduler(table)
    never.choose([np.array([0.01, 0.01])] * 4, [2] * 4)  # drafts that are never worth a wider call
    assert not never.should_draft(1)


def test_sps_probes_a_priced_out_draft_now_and_then_and_remembers_recent_rounds_most():
    table = StepsPerSecond(rows=[1, 4], widths=[1, 2, 3], steps_per_second=[[100.0, 95.0, 90.0], [50.0, 42.0, 36.0]],
                           draft_seconds=[0.001, 0.012])
    sps = SpsScheduler(table)
    sps.choose([np.array([0.6, 0.5])] * 4, [2] * 4)  # priced out at 4 rows (see above)
    every = SpsScheduler.PROBE_EVERY
    decisions = [sps.should_draft(4) for _ in range(2 * every + 2)]
    probes = [i for i, d in enumerate(decisions) if d]
    assert probes == [every, 2 * every + 1]  # one round in PROBE_EVERY + 1
    # the memory holds the last MEMORY drafting rounds: once sure drafts filled it, 4 rows draft again
    for _ in range(SpsScheduler.MEMORY):
        sps.choose([np.array([0.99, 0.99])] * 4, [2] * 4)
    assert len(sps.recent) == SpsScheduler.MEMORY and all(s[0] == 0.99 for s, _ in sps.recent)
    assert sps.should_draft(4) and sps.refused == 0


def test_sps_probes_a_dear_draft_as_seldom_as_its_share_of_the_time_allows():
    """A probe costs what a replayed round loses against plain decoding: where that is more than PROBE_SHARE of the
    plain steps refused between probes, probes wait longer."""
    table = StepsPerSecond(rows=[1, 4], widths=[1, 2, 3], steps_per_second=[[100.0, 95.0, 90.0], [50.0, 42.0, 36.0]],
                           draft_seconds=[0.001, 0.1])
    sps = SpsScheduler(table)
    sps.choose([np.array([0.6, 0.5])] * 4, [2] * 4)
    # 4 rows: 7.6 tokens in 100 + 27.8 ms, where plain decoding takes 7.6 / 200 s = 38 ms: 89.8 ms lost, 4.49 steps
    # of 20 ms, which PROBE_SHARE 0.02 spreads over 224.5 refused rounds
    decisions = [sps.should_draft(4) for _ in range(2 * 226)]
    assert [i for i, d in enumerate(decisions) if d] == [225, 451]
    # 1 row drafts (1.9 tokens in 1 + 11.1 ms beat 100 tokens/s) without waiting
    assert sps.should_draft(1)


def test_sps_drafts_where_the_rounds_left_repay_the_drafters_backlog():
    """A drafter that has not read every committed token (a new row's prompt, rounds it sat out) reads them first:
    a round drafts where the remembered rounds' gain over the rounds left repays that, and a probe that would pay
    it waits the longer."""
    table = StepsPerSecond(rows=[1, 4], widths=[1, 2, 3], steps_per_second=[[100.0, 95.0, 90.0], [50.0, 42.0, 36.0]],
                           draft_seconds=[0.001, 0.012], draft_read_seconds=[0.0005, 0.002])
    assert table.read_cost(1, 100) == 0.05 and table.read_cost(2, 10) == pytest.approx(0.01)
    sps = SpsScheduler(table)
    sps.choose([np.array([0.6, 0.5])], [2])
    # 1 row, width 2: 1.9 tokens in 1 + 11.1 ms, which plain decoding takes 19 ms for: 0.689 steps gained a round.
    # 100 tokens to read cost 50 ms, 5 steps: repaid over 7.26 rounds of 1.9 tokens, 13.8 tokens left
    assert sps.should_draft(1) and sps.should_draft(1, 0, 1)
    assert not sps.should_draft(1, 100, 13) and sps.should_draft(1, 100, 14)
    # a probe costs the backlog and the round: (5 - 0.689) / PROBE_SHARE = 215.6 refused rounds
    decisions = [sps.should_draft(1, 100, 10) for _ in range(2 * 217)]
    assert [i for i, d in enumerate(decisions) if d] == [216, 433]
    unpriced = SpsScheduler(StepsPerSecond(table.rows, table.widths, table.steps_per_second, table.draft_seconds))
    unpriced.choose([np.array([0.6, 0.5])], [2])
    assert unpriced.should_draft(1, 100, 1)  # a profile that did not time reading: the backlog costs nothing


def test_a_draft_lm_drafts_one_past_the_widest_verify_its_remembered_rounds_get():
    """Positions past the verify are drafted for nothing: a drafter that pays by the position drafts one past the
    widest width the remembered rounds get replayed at the current rows; a block drafter, whose one call drafts the
    block whatever it keeps, drafts it whole."""
    rates = [[100.0, 95.0, 90.0, 85.0, 80.0], [50.0, 42.0, 36.0, 30.0, 26.0]]
    per_position = StepsPerSecond(rows=[1, 4], widths=[1, 2, 3, 4, 5], steps_per_second=rates,
                                  draft_seconds=[0.001, 0.004], draft_length=4, draft_cost_per_position=True)
    sps = SpsScheduler(per_position)
    assert sps.draft_positions(4, 4) == 4  # nothing remembered yet
    sps.choose([np.array([0.9, 0.8, 0.5, 0.5])] * 4, [4] * 4)
    # 4 rows: width 2 (4 + 3.6 + 2.88 = 10.48 tokens x 36 > 7.6 x 42; the third position's 1.44 more x 30 is less);
    # 1 row: every position pays (1 + 0.9 + 0.72 + 0.36 + 0.18, each x the next rate, rises to width 4)
    assert sps.draft_positions(4, 4) == 3 and sps.draft_positions(1, 4) == 4
    whole = SpsScheduler(StepsPerSecond(per_position.rows, per_position.widths, rates, per_position.draft_seconds, 4))
    whole.choose([np.array([0.9, 0.8, 0.5, 0.5])] * 4, [4] * 4)
    assert whole.draft_positions(4, 4) == 4


def test_sps_replays_remembered_rounds_rather_than_their_mean_survival():
    """sps verifies each round as far as its own drafts are sure: half the rounds sure of two drafts and half unsure
    of any pay (each at its own width) where rows of their mean survival would not."""
    def schedulers(table):
        replayed, mean = SpsScheduler(table), SpsScheduler(table)
        for _ in range(4):
            replayed.choose([np.array([0.95, 0.95])], [2])
            replayed.choose([np.array([0.05, 0.05])], [2])
        mean.choose([np.array([0.5, 0.905])], [2])
        return replayed, mean

    table = StepsPerSecond(rows=[1], widths=[1, 2, 3], steps_per_second=[[100.0, 80.0, 70.0]], draft_seconds=[0.002])
    # replayed: width 2 for the sure (2.85 tokens in 2 + 14.3 ms), none for the unsure (1 token in 2 + 10 ms):
    # 3.85 / 28.3 ms = 136/s > 100; their mean survival (0.5, 0.4525) verifies width 2 too: 1.95 / 16.3 ms = 120/s
    sps, mean = schedulers(table)
    assert sps.should_draft(1) and mean.should_draft(1)
    dearer = StepsPerSecond(table.rows, table.widths, table.steps_per_second, draft_seconds=[0.006])
    sps, mean = schedulers(dearer)  # 3.85 / 36.3 ms = 106/s > 100, but 1.95 / 20.3 ms = 96/s < 100
    assert sps.should_draft(1) and not mean.should_draft(1)


def test_sps_prices_a_draft_lm_round_by_the_positions_it_drafts():
    """A draft LM stops drafting where it is unsure: its round costs a share of the profiled whole-length round."""
    rates = [[100.0, 95.0, 90.0, 85.0, 80.0], [50.0, 42.0, 36.0, 30.0, 26.0]]
    whole = StepsPerSecond(rows=[1, 4], widths=[1, 2, 3, 4, 5], steps_per_second=rates, draft_seconds=[0.001, 0.032],
                           draft_length=4, draft_cost_per_position=False)
    shared = StepsPerSecond(whole.rows, whole.widths, rates, whole.draft_seconds, 4, draft_cost_per_position=True)
    drafts = [np.array([0.9, 0.8])] * 4  # rounds that drafted 2 of 4 positions
    schedulers = [SpsScheduler(whole), SpsScheduler(shared)]
    for sps in schedulers:
        sps.choose(drafts, [2] * 4)
    assert schedulers[0].draft_cost(4, 2) == 0.032 and schedulers[1].draft_cost(4, 2) == pytest.approx(0.016)
    # 4 rows, width 2: 4 + 3.6 + 2.88 = 10.48 tokens in 32 + 27.8 ms (175/s) or 16 + 27.8 ms (239/s), against 200
    assert [sps.should_draft(4) for sps in schedulers] == [False, True]


def test_a_profile_without_the_drafters_cost_asks_to_profile_again(dspark_bundle, tmp_path, caplog):
    bundle = tmp_path / "bundle"
    shutil.copytree(dspark_bundle, bundle)
    steep_from_two_rows(bundle)  # verify calls only, as 'dspark profile' wrote them before it timed drafters
    with caplog.at_level("WARNING", logger="dspark"):
        Generator(bundle, scheduler="sps")
        Generator(bundle, scheduler="sps", use_draft=False)  # nothing to price without a drafter
    assert [r.getMessage().endswith(f"run 'dspark profile {bundle}' again") for r in caplog.records] == [True]
    made_up_profile(bundle, cheap_verify, draft_seconds=lambda rows: 0.01)  # a round, but not reading a backlog
    caplog.clear()
    with caplog.at_level("WARNING", logger="dspark"):
        Generator(bundle, scheduler="sps")
    assert len(caplog.records) == 1
    dear_drafts_from_two_rows(bundle)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dspark"):
        Generator(bundle, scheduler="sps")
    assert not caplog.records


@pytest.mark.parametrize("profile", [steep_from_two_rows, dear_drafts_from_two_rows])
def test_rounds_sps_expects_nothing_of_are_not_drafted(dspark_bundle, tmp_path, profile):
    """With two rows or more the table says no draft can pay (steep: not even a sure one; dear drafts: none like the
    drafts seen, once the first round has drafted), so those rounds do not call the drafter; once one request is left
    they draft, and the tokens are plain decoding's."""
    bundle = tmp_path / "bundle"
    shutil.copytree(dspark_bundle, bundle)
    profile(bundle)
    requests = [Request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS[:3], (10, 14, 30))]
    gen = Generator(bundle, scheduler="sps")
    got = gen.generate(requests, trace=True)
    plain = Generator(bundle, use_draft=False).generate(requests)
    assert [s.generated for s in got] == [s.generated for s in plain]
    assert not gen.scheduler.stats.fallbacks
    first = profile is dear_drafts_from_two_rows  # the first round drafts: no draft has been seen yet
    assert [[d > 0 for d in s.drafted] for s in got[:2]] == [[first] + [False] * (len(s.drafted) - 1) for s in got[:2]]
    assert max(got[2].drafted[1:]) > 0


def test_block_schedule():
    fixed = make_block_schedule("1:5,4:2,8:0")
    assert [fixed.cap(n, 5) for n in (1, 3, 4, 7, 8, 16)] == [5, 5, 2, 2, 0, 0]
    assert fixed.cap(1, 3) == 3  # never above the proposer's length
    assert make_block_schedule({8: 0, 1: 5, 4: 2}).describe() == "1:5,4:2,8:0"
    assert make_block_schedule(None) is None and make_block_schedule("off") is None  # draft at every batch size
    for bad in ("1:x", "0:3", "2:-1", "4", "fast"):
        with pytest.raises(DsparkError, match="block schedule"):
            make_block_schedule(bad)


def test_auto_block_schedule_drafts_where_drafting_measured_faster():
    auto = make_block_schedule("auto")
    assert auto.describe() == "auto"

    def run(rows, rounds, drafting_rate, plain_rate):
        caps = []
        for _ in range(rounds):
            cap = auto.cap(rows, 7)
            caps.append(cap)
            auto.observe(rows, cap > 0, drafting_rate if cap else plain_rate, 1.0)
        return caps

    one = run(1, 60, 300, 100)  # one row: drafting pays
    assert one[:10] == [7] * 9 + [0]  # drafting explored first (its first round forgotten), then plain once
    assert one[10:34] == [7] * 24 and one[34] == 0  # then the faster one, with a probe of the other after 24 rounds
    assert one.count(0) == 2  # the probe confirmed the decision: the next one waits 48 rounds
    four = run(4, 60, 80, 120)  # 4-7 rows: plain is faster, drafting is only probed
    assert four[:10] == [7] * 9 + [0] and four.count(7) == 10
    assert run(5, 10, 80, 120) == [0] * 10  # same bucket as 4
    assert run(1, 3, 300, 100) == [7] * 3  # buckets keep their own state
    slow_start = make_block_schedule("auto")
    slow_start.observe(2, True, 3, 20.0)  # one slow first drafting round (warm-up) ...
    for _ in range(8):
        slow_start.observe(2, True, 300, 1.0)
    slow_start.observe(2, False, 250, 1.0)
    assert slow_start.cap(2, 7) == 7  # ... does not decide (with it, drafting would rate 50 tokens/s): it is forgotten


def test_auto_block_schedule_probes_less_while_probes_confirm():
    auto = make_block_schedule("auto")
    rates = {True: 80, False: 120}  # drafting slower
    caps = []
    for round_ in range(2000):
        if round_ == 1500:
            rates = {True: 300, False: 120}  # the regime changes: drafting now pays
        cap = auto.cap(4, 7)
        caps.append(cap)
        auto.observe(4, cap > 0, rates[cap > 0], 1.0)
    probes = [i for i, c in enumerate(caps[:1500]) if c and i > 8]  # (after the nine exploring rounds)
    gaps = np.diff(probes)
    assert list(gaps[:4]) == [49, 97, 193, 385]  # each confirming probe doubles the wait (24 rounds x 2^k, + the probe)
    assert max(gaps) <= 24 * 16 + 1 and len(probes) < 10  # at most 16x the base period
    # after the change the next probe is faster: with it drafting's rate, within two standard errors of plain's (one
    # round unlike the others spreads them), no longer says drafting is slower, and it drafts from then on, probing
    # plain decoding every 24 rounds
    late = [i for i, c in enumerate(caps) if c and i >= 1500]
    assert late[0] <= 1500 + 24 * 16 and caps[late[0]:late[0] + 25] == [7] * 25 and caps[-50:].count(0) <= 2


def test_auto_block_schedule_judges_skewed_drafting_rounds_by_their_total_rate():
    """Most rounds of a τ-2 draft accept nothing: judged by its median round, a drafter 1.8x faster than plain
    decoding looks slower than it."""
    auto = make_block_schedule("auto")
    tokens = itertools.cycle([1, 1, 5])  # per drafting round, each 1.3 plain rounds long: 7 / 3.9 = 1.8 per unit
    caps = []
    for _ in range(200):
        cap = auto.cap(1, 7)
        caps.append(cap)
        auto.observe(1, cap > 0, next(tokens) if cap else 1, 1.3 if cap else 1.0)
    assert caps[2:].count(0) <= 8  # plain is only probed

def test_auto_block_schedule_keeps_a_noisy_faster_drafter_on():
    """Rounds as SmolLM2's DSpark drafter has them at one request (P(at least k accepted) 0.56 0.32 0.20 0.12 0.09
    0.06 0.04, a drafting round 20.5 ms against a plain one of 11.4, so 1.3x faster drafting): a window of such rounds
    is noisy, and drafting must not be turned off by an unlucky one (with a window of 8, 4 exploring rounds and no
    margin, 9% of the rounds drafted); where drafting is 0.73x of plain it is turned off."""
    at_least = np.array([0.56, 0.32, 0.20, 0.12, 0.09, 0.06, 0.04])

    def share_drafted(draft_s, plain_s, seed, rounds=2000):
        rng, auto, drafted = np.random.default_rng(seed), make_block_schedule("auto"), 0
        for _ in range(rounds):
            cap = auto.cap(1, 7)
            tokens = 1 + int((rng.random() < at_least).sum()) if cap else 1
            auto.observe(1, cap > 0, tokens, (draft_s if cap else plain_s) * rng.uniform(0.95, 1.05))
            drafted += cap > 0
        return drafted / rounds

    assert np.mean([share_drafted(0.0205, 0.0114, seed) for seed in range(10)]) > 0.85
    assert np.mean([share_drafted(0.0205, 0.0067, seed) for seed in range(10)]) < 0.06


def test_sts_recovers_known_miscalibration():
    rng = np.random.default_rng(0)
    rounds, block = 6000, 4
    true = rng.uniform(0.05, 0.95, (rounds, block))
    logits = 3.0 * np.log(true / (1 - true))  # over-confident by a temperature of 3 at every position
    survive = (rng.random((rounds, block)) < true).cumprod(axis=1)
    accepted = survive.sum(axis=1)
    fit = fit_sts(logits[: rounds // 2], np.full(rounds // 2, block), accepted[: rounds // 2])
    temps = np.asarray(fit["sts_temperatures"])
    # position 1 is identified exactly; later ones only through the product's ECE, so only their direction is
    assert abs(temps[0] - 3.0) < 0.3 and np.all(temps > 1.5), temps
    held_logits, held_acc = logits[rounds // 2 :], accepted[rounds // 2 :]
    for k in range(block):
        labels = (held_acc >= k + 1).astype(float)
        raw = np.prod(1 / (1 + np.exp(-held_logits[:, : k + 1])), axis=1)
        fitted = np.prod(1 / (1 + np.exp(-held_logits[:, : k + 1] / temps[: k + 1])), axis=1)
        assert ece(fitted, labels) < 0.5 * ece(raw, labels)
        assert fit["ece_after"][k] < fit["ece_before"][k]


def test_sts_fits_each_position_on_the_rounds_that_verified_it():
    """Ragged rounds, as a draft LM's stop rule makes them: position k is fitted on the rounds that verified it,
    logits past a round's verified positions are never read, and a position no round reached keeps t = 1."""
    rng = np.random.default_rng(1)
    rounds, block = 6000, 5
    true = rng.uniform(0.05, 0.95, (rounds, block))
    logits = 3.0 * np.log(true / (1 - true))
    survive = (rng.random((rounds, block)) < true).cumprod(axis=1)
    verified = np.minimum(np.argmax(np.cumprod(true, axis=1) < 0.2, axis=1) + 1, block - 1)  # never position 5
    accepted = np.minimum(survive.sum(axis=1), verified)
    garbage = logits.copy()
    garbage[np.arange(block)[None, :] >= verified[:, None]] = 1e3
    fit = fit_sts(garbage, verified, accepted)
    assert fit == fit_sts(np.where(garbage == 1e3, -7.0, garbage), verified, accepted)
    temps = np.asarray(fit["sts_temperatures"])
    assert abs(temps[0] - 3.0) < 0.5 and np.all(temps[:4] > 1.5) and temps[4] == 1.0, temps
    assert fit["rounds_by_position"][0] == rounds and fit["rounds_by_position"][4] == 0
    assert all(a < b for a, b in zip(fit["ece_after"][:4], fit["ece_before"][:4]))


def test_sts_bias_fixes_an_understated_confidence():
    """A draft LM's likeliest-token probability understates greedy acceptance at every level; a temperature keeps
    sigmoid's midpoint and cannot lift it, the fitted bias does (the SmolLM2 draft LM: ECE 0.12 -> 0.04)."""
    rng = np.random.default_rng(2)
    rounds, block = 6000, 3
    true = rng.uniform(0.2, 0.95, (rounds, block))
    logits = np.log(true / (1 - true)) - 1.0  # every confidence understated by a shift of one logit
    survive = (rng.random((rounds, block)) < true).cumprod(axis=1)
    fit = fit_sts(logits, np.full(rounds, block), survive.sum(axis=1))
    assert abs(fit["sts_biases"][0] - 1.0) < 0.2 and abs(fit["sts_temperatures"][0] - 1.0) < 0.2, fit
    assert all(a < 0.3 * b for a, b in zip(fit["ece_after"], fit["ece_before"])), fit
    temperature_only = min(ece(1 / (1 + np.exp(-logits[:, 0] / t)), survive[:, 0].astype(float)) for t in GRID)
    assert fit["ece_after"][0] < 0.3 * temperature_only


def test_ece_weighs_each_bins_gap_by_its_size():
    pred = np.array([0.01, 0.04, 0.5, 0.52, 0.99, 1.0])
    labels = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    # bins of width 0.05: {0.01, 0.04} gap |0.05 - 1|, {0.5, 0.52} gap |1.02 - 2|, {0.99, 1.0} (the last bin) |1.99 - 1|
    assert ece(pred, labels) == pytest.approx((0.95 + 0.98 + 0.99) / 6)


def test_a_calibration_of_temperatures_alone_still_loads(qwen3_bundle, tmp_path):
    """calibration.json from dspark 0.4.4 and older holds no biases: they are 0, so confidences stay as they were."""
    bundle = tmp_path / "bundle"
    shutil.copytree(qwen3_bundle, bundle)
    Bundle.open(bundle).add_file(CALIBRATION_FILE, json.dumps({"sts_temperatures": [2.0, 0.5]}))
    calibration = load_calibration(Bundle.open(bundle))
    z = np.array([1.0, -1.0, 3.0])  # the third position was never fitted: raw
    assert np.allclose(calibration(z), 1 / (1 + np.exp(-np.array([0.5, -2.0, 3.0]))))


def test_calibrated_draft_lm_bundle_schedules_on_its_calibration(qwen3_bundle, tmp_path, backend):
    """'dspark calibrate' takes a draft LM: its temperatures and biases land in the bundle, the draft LM's
    confidences are calibrated by them, and sps over the calibrated bundle writes plain decoding's tokens."""
    from click.testing import CliRunner

    from dspark.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(qwen3_bundle, bundle)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\nw3 w3 w3 w3\nw11 w12\n")
    result = CliRunner().invoke(main, ["calibrate", str(bundle), "--data", str(prompts), "--max-new-tokens", "40",
                                       "--backend", backend])
    assert result.exit_code == 0, result.output
    fitted = Bundle.open(bundle).read_json("calibration.json")
    temps, biases = np.asarray(fitted["sts_temperatures"]), np.asarray(fitted["sts_biases"])
    assert len(temps) == len(biases) == 6 and not (np.allclose(temps, 1.0) and np.allclose(biases, 0.0))
    # each verified token adds 5% to a call (under load a measured table made every draft look too dear)
    made_up_profile(bundle, lambda rows, width: 100 / (1 + 0.05 * (width - 1)), backend)
    spec = Generator(bundle, scheduler="sps", backend=backend)
    assert np.array_equal(spec.calibration.temperatures, temps) and np.array_equal(spec.calibration.biases, biases)
    probe = Generator(bundle, backend=backend).proposer
    probe.add(1)
    probed = Sequence(request=Request([5, 6, 7], 8), rng=None, tokens=[5, 6, 7], stream=None)
    proposal = probe.propose([probed], [6])[0]
    z = proposal.confidence_logits
    n = len(z)
    assert n and np.allclose(spec._confidence(proposal), 1 / (1 + np.exp(-(z / temps[:n] + biases[:n]))))
    assert_speculative_equals_plain(spec, Generator(bundle, use_draft=False, backend=backend), PROMPTS, 30)
    assert spec.scheduler.stats.fallbacks == {}


def test_a_timed_block_draft_round_reads_context_features_as_a_round_in_a_run_does(dspark_bundle):
    """A block drafter's round in a run first turns the accepted tokens' features into context (draft_context),
    then drafts (draft_propose); the round that profile and bench time makes both calls, every time, and leaves
    the context cache as it found it."""
    gen = Generator(dspark_bundle)
    proposer = gen.proposer
    calls = {"draft_context": 0, "draft_propose": 0}

    def counted(name, runner):
        run = runner.run

        def counting(*args, **kwargs):
            calls[name] += 1
            return run(*args, **kwargs)
        runner.run = counting

    counted("draft_context", proposer.context)
    counted("draft_propose", proposer.drafter)
    _, probe, clean_up = cost_probe(gen, 2, list(range(3, 40)))
    lens = proposer.cache.lens.copy()
    calls.update(draft_context=0, draft_propose=0)
    for _ in range(3):
        probe["t_draft_ms"]()
        assert np.array_equal(proposer.cache.lens, lens)
    assert calls == {"draft_context": 3, "draft_propose": 3}
    clean_up()


@pytest.mark.parametrize("name", ["qwen3_bundle", "dspark_bundle"])
def test_a_drafters_backlog_is_what_its_next_round_reads_beyond_a_rounds_own(name, request):
    """New rows' prompts, then a token a round for each round the drafter sits out, on the widest row; the round
    that profile times with a backlog reads that many tokens (features) a row more than its plain timed round."""
    gen = Generator(request.getfixturevalue(name), block_schedule="1:0")  # never drafts
    proposer = gen.proposer
    for p in PROMPTS[:2]:
        gen.submit(Request(p, max_new_tokens=8, ignore_eos=True))
    gen.admit()
    # a draft LM has read nothing yet (prompt and first token); a block drafter holds the prompt's features
    unread = max(len(p) for p in PROMPTS[:2]) + (1 if name == "qwen3_bundle" else 0)
    assert proposer.backlog(gen.running) == unread - proposer.ROUND_READS
    for n in range(1, 4):
        gen.step()
        assert proposer.backlog(gen.running) == unread + n - proposer.ROUND_READS

    timed = Generator(request.getfixturevalue(name), scheduler="fixed")
    proposer = timed.proposer
    runner = proposer.context if proposer.reads_features else proposer.runner
    widths, run = [], runner.run

    def recording(feeds, *args, **kwargs):
        widths.append(feeds["features" if proposer.reads_features else "input_ids"].shape[1])
        return run(feeds, *args, **kwargs)

    runner.run = recording
    _, probe, clean_up = cost_probe(timed, 2, list(range(3, 40)), backlog=5)
    first_reads = []
    for call in ("t_draft_ms", "t_draft_backlog_ms"):
        widths.clear()
        probe[call]()
        first_reads.append(widths[0])
    clean_up()
    assert first_reads == [proposer.ROUND_READS, proposer.ROUND_READS + 5]


@pytest.fixture(scope="module")
def profiled(dspark_bundle, tmp_path_factory, backend):
    copy = tmp_path_factory.mktemp("profiled") / "bundle"
    shutil.copytree(dspark_bundle, copy)
    table = profile_bundle(copy, backend, repeats=3, warmup=1, context=32, progress=False)
    assert table["rows"] == [1, 2, 4, 8] and table["widths"] == [1, 2, 3, 4, 5, 6]
    # the drafter's round, timed at every row count (which costs more is the machine's to say: under a loaded CI
    # machine a 1-row round once timed 4.8 ms against 0.8 ms for 8 rows)
    assert table["draft_length"] == Generator(copy, backend=backend).draft_length
    assert len(table["draft_seconds"]) == 4 and all(seconds > 0 for seconds in table["draft_seconds"])
    assert len(table["draft_read_seconds"]) == 4 and all(seconds >= 0 for seconds in table["draft_read_seconds"])
    assert table["draft_cost_per_position"] is False  # one call drafts the block, whatever the rows keep of it
    assert Bundle.open(copy).read_json(profile_key(backend)) == table  # recorded in the manifest, hash verified
    return copy


@pytest.mark.parametrize("scheduler", ["fixed", "threshold", "sps", "auto"])
def test_greedy_output_is_unchanged_by_scheduler(profiled, scheduler, backend):
    plain = Generator(profiled, use_draft=False, backend=backend)
    requests = [Request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, (20, 33, 7, 25, 18, 30, 12, 9))]
    want = [s.generated for s in plain.generate(requests)]
    gen = Generator(profiled, scheduler=scheduler, threshold=0.6, backend=backend)
    got = gen.generate(requests, trace=True)
    assert [s.generated for s in got] == want
    assert gen.scheduler.stats.fallbacks == {}
    verified = [r["verify_length"] for s in got for r in s.trace]
    drafted = [len(r["draft_tokens"]) for s in got for r in s.trace]
    if scheduler == "fixed":
        assert verified == drafted
    else:  # confidence-driven schedulers verify less than the block on this random drafter
        assert sum(verified) < sum(drafted)


def test_lookup_confidence_is_its_measured_acceptance(profiled, backend, tmp_path):
    """Lookup drafts' confidences are their recent acceptance rates: a lookup that keeps failing at its first
    position stops being verified under sps, is tried again once those failures have faded, and the output is
    plain decoding's throughout."""
    lookup = Generator(profiled, use_draft=False, lookup=2, scheduler="sps", backend=backend).proposer
    rates = lambda: 1 / (1 + np.exp(-lookup.confidence_logits(lookup.OWN, 3)))  # noqa: E731
    table = StepsPerSecond([1], [1, 2, 4], [[100.0, 60.0, 50.0]])
    assert np.allclose(rates(), lookup.PRIOR) and sps_lengths([rates()], [3], table) == [3]
    for _ in range(40):  # 3 drafts verified, the first rejected: position 1 tried and missed, 2 and 3 never tried
        lookup.sources = [lookup.OWN]
        lookup.commit([0], [3], [3], [0], None)
    assert rates()[0] < 0.2 and np.allclose(rates()[1:], lookup.PRIOR)
    assert sps_lengths([rates()], [3], table) == [0]
    skipped = 0
    while sps_lengths([rates()], [3], table) == [0]:  # drafts not verified: the failures fade
        lookup.sources = [lookup.OWN]
        lookup.commit([0], [3], [0], [0], None)
        skipped += 1
    assert 10 < skipped < 200

    requests = [Request(p, max_new_tokens=30, ignore_eos=True) for p in PROMPTS]
    cheap = tmp_path / "bundle"  # whether lookup drafts at 8 rows must not hang on this machine's load
    shutil.copytree(profiled, cheap)
    made_up_profile(cheap, lambda rows, width: 100 / (1 + 0.05 * (width - 1)), backend)
    gen = Generator(cheap, use_draft=False, lookup=2, scheduler="sps", backend=backend)
    got = gen.generate(requests, trace=True)
    plain = Generator(profiled, use_draft=False, backend=backend).generate(requests)
    assert [s.generated for s in got] == [s.generated for s in plain]
    assert any(r["draft_tokens"] for s in got for r in s.trace)


def test_auto_scheduler_is_sps_where_the_bundle_is_profiled(profiled, dspark_bundle, backend, tmp_path):
    """The default, auto: sps over a profiled bundle's table, fixed (with nothing to fall back from) where there is
    no table or nothing drafted; calibration verifies every drafted position whatever the bundle has."""
    assert Generator(profiled, backend=backend).scheduler.name == "sps"
    assert Generator(profiled, use_draft=False, backend=backend).scheduler.name == "fixed"
    unprofiled = Generator(dspark_bundle, backend=backend)
    assert unprofiled.scheduler.name == "fixed"
    unprofiled.generate([Request(PROMPTS[0], max_new_tokens=12, ignore_eos=True)])
    assert unprofiled.scheduler.stats.fallbacks == {}
    prompts = [" ".join(f"w{t}" for t in p) for p in PROMPTS[:3]]
    reports = []
    for name, source in (("profiled", profiled), ("unprofiled", dspark_bundle)):
        shutil.copytree(source, tmp_path / name)
        reports.append(calibrate_bundle(tmp_path / name, prompts, max_new_tokens=16, progress=False, backend=backend))
    assert reports[0]["rounds_by_position"] == reports[1]["rounds_by_position"]


def test_missing_table_or_head_falls_back_to_fixed(dspark_bundle, qwen3_bundle, backend):
    req = Request(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    gen = Generator(dspark_bundle, scheduler="sps", backend=backend)  # this bundle has no profile
    assert gen.generate([req])[0].generated == Generator(dspark_bundle, use_draft=False, backend=backend).generate([req])[0].generated
    assert sum(gen.scheduler.stats.fallbacks.values()) > 0
    # a draft LM's confidences are its own probabilities: the threshold scheduler uses them, and stays exact
    lm = Generator(qwen3_bundle, scheduler="threshold", threshold=0.9, backend=backend)
    seq = lm.generate([req], trace=True)[0]
    assert not lm.scheduler.stats.fallbacks
    assert seq.generated == Generator(qwen3_bundle, use_draft=False, backend=backend).generate([req])[0].generated
    assert any(r["verify_length"] < len(r["draft_tokens"]) for r in seq.trace)


def test_auto_block_schedule_is_lossless(dspark_bundle, backend):
    requests = [Request(p, max_new_tokens=40, ignore_eos=True) for p in PROMPTS[:3]]
    gen = Generator(dspark_bundle, block_schedule="auto", backend=backend)
    got = gen.generate(requests)
    plain = Generator(dspark_bundle, use_draft=False, backend=backend).generate(requests)
    assert [s.generated for s in got] == [s.generated for s in plain]
    assert min(got[0].verified[:9]) > 0 and got[0].verified[9] == 0  # it measured both modes


def test_zero_block_length_means_plain_decoding(dspark_bundle, backend):
    gen = Generator(dspark_bundle, block_schedule={1: 5, 2: 0}, backend=backend)
    requests = [Request(p, max_new_tokens=15, ignore_eos=True) for p in PROMPTS[:3]]
    got = gen.generate(requests)
    plain = Generator(dspark_bundle, use_draft=False, backend=backend).generate(requests)
    assert [s.generated for s in got] == [s.generated for s in plain]
    assert all(v == 0 for s in got for v in s.verified[:5])  # three rows at once: the schedule turns drafting off


def test_continuous_batching_equals_each_request_alone(dspark_bundle, backend):
    alone = Generator(dspark_bundle, backend=backend)
    params = [SamplingParams(), SamplingParams(0.8, top_p=0.9)]
    requests = [Request(p, max_new_tokens=10 + 3 * i, sampling=params[i % 2], seed=i, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
    want = [alone.generate([r])[0].generated for r in requests]
    gen = Generator(dspark_bundle, max_batch=3, backend=backend)
    seqs = [gen.submit(r) for r in requests[:2]]
    gen.step()
    gen.step()
    seqs += [gen.submit(r) for r in requests[2:5]]
    gen.step()
    seqs += [gen.submit(r) for r in requests[5:]]
    peak = 0
    while gen.has_work():
        gen.step()
        peak = max(peak, len(gen.running))
    assert peak == 3
    assert [s.generated for s in seqs] == want


def test_finished_rows_are_filled_from_the_end_moving_only_live_positions():
    """A finished request's row is refilled by the last running row (one row moves, not every row after it), and
    only a moved row's live positions are copied; an order that would overwrite a kept row before it moves is
    refused."""
    assert fill_order([True, False, True, True, False, True]) == [0, 5, 2, 3]
    assert fill_order([False, False, True]) == [2]
    assert fill_order([True, True]) == [0, 1]
    cache = KVCache(2, 4, 1, 2, np.float32, max_len=16, capacity=8)
    cache._k[...] = np.arange(4)[None, :, None, None, None] + 1  # row r holds r + 1 everywhere
    cache._v[...] = -cache._k
    cache.lens[:] = [8, 3, 5, 2]
    cache.keep_rows(fill_order([True, False, True, True]))  # row 3 moves into row 1's slot
    assert cache.rows == 3 and cache.lens.tolist() == [8, 2, 5]
    assert (cache.k[:, 1, :, :2] == 4).all() and (cache.k[:, 1, :, 2:] == 2).all()  # past its length: stale
    assert (cache.v[:, 1, :, :2] == -4).all() and (cache.k[:, 2] == 3).all() and (cache.k[:, 0] == 1).all()
    with pytest.raises(ValueError, match="overwrite row 0"):
        cache.keep_rows([1, 0])  # a swap: row 0 would be gone before it moves


def test_cancel_frees_the_row(dspark_bundle, backend):
    gen = Generator(dspark_bundle, max_batch=1, backend=backend)
    first = gen.submit(Request(PROMPTS[1], max_new_tokens=200, ignore_eos=True))
    second = gen.submit(Request(PROMPTS[0], max_new_tokens=5, ignore_eos=True))
    gen.step()
    assert gen.running == [first]
    gen.cancel(first)
    while gen.has_work():
        gen.step()
    assert first.finish_reason == "cancelled" and first.done_event.is_set()
    assert second.finish_reason == "length" and len(second.generated) == 5


def test_cli_prompts_file_profile_and_calibrate(dspark_bundle, tmp_path):
    from click.testing import CliRunner

    from dspark.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(dspark_bundle, bundle)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('w5 w6 w7\n{"prompt": "w3 w3 w3 w3"}\n\nw11 w12\n')
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(bundle), "--prompts-file", str(prompts), "--max-new-tokens", "9",
                                  "--ignore-eos", "--json", "--scheduler", "threshold", "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    for line, text in zip(lines, ["w5 w6 w7", "w3 w3 w3 w3", "w11 w12"]):
        single = runner.invoke(main, ["generate", str(bundle), "--prompt", text, "--max-new-tokens", "9", "--ignore-eos",
                                      "--json", "--no-draft"])
        assert json.loads(single.output.strip().splitlines()[-1])["token_ids"] == line["token_ids"]
        assert set(line) == {"text", "token_ids", "finish_reason", "stats"}
    assert len(lines) == 3

    result = runner.invoke(main, ["profile", str(bundle), "--repeats", "2", "--warmup", "1", "--context", "16"])
    assert result.exit_code == 0, result.output
    assert "steps/s" in result.output
    result = runner.invoke(main, ["calibrate", str(bundle), "--data", str(prompts), "--max-new-tokens", "40",
                                  "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "prompt/s" not in result.output and "bias" in result.output  # no bar; the fit's table
    data = Bundle.open(bundle).read_json("calibration.json")
    assert len(data["sts_temperatures"]) == 5 and data["rounds"] > 0
    # the calibrated, profiled bundle still decodes losslessly under sps
    result = runner.invoke(main, ["generate", str(bundle), "--prompt", "w5 w6 w7", "--max-new-tokens", "9",
                                  "--ignore-eos", "--json", "--scheduler", "sps"])
    assert json.loads(result.output.strip().splitlines()[-1])["token_ids"] == lines[0]["token_ids"]
