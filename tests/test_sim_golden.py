"""Golden tests of the simulator's semantics on small hand-computed cases.

Every test runs against both implementations (``sim_impl``: compiled ``c`` and twin
``py``) and with fast-forward on and off.  The step-time model used here is
``1 s + 10 ms per prefill token + 100 ms per decoding sequence``, so the expected times
can be checked with pencil and paper; the derivations are in the comments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from blockproxy.simulator import Prediction

FIXED = 1.0
PREFILL = 0.01
DECODE = 0.1


@pytest.fixture(params=[True, False], ids=["ff", "stepwise"])
def fast_forward(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def make_model(sim_impl, fast_forward: bool, *, max_num_seqs: int = 256,
               max_num_batched_tokens: int = 8192, num_gpu_blocks: int = 10_000,
               block_size: int = 16, past_prediction_tokens: int = 16):
    return sim_impl(max_num_seqs, max_num_batched_tokens, num_gpu_blocks, block_size,
                    FIXED, PREFILL, DECODE, 0.0, 1.0, past_prediction_tokens,
                    fast_forward=fast_forward)


def state(*requests: tuple[int, int, int, int, int]) -> np.ndarray:
    """Columns (prompt, cached, generated, predicted, started), one tuple per request."""
    arr = np.zeros((5, max(len(requests), 1)), dtype=np.int64)
    for i, req in enumerate(requests):
        arr[:, i] = req
    return arr


def predict(model, st: np.ndarray, n: int, prompt: int, cached: int, output: int) -> Prediction:
    return Prediction(*model.predict(st, n, prompt, cached, output))


def test_empty_instance_ttft_is_one_prefill_step(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    p = predict(model, state(), 0, 100, 0, 1)
    # One step computing 100 prompt tokens: 1 + 100 * 0.01.
    assert p.ttft == pytest.approx(2.0, rel=1e-12)
    assert p.e2e == p.ttft
    assert p.queue_delay == 0.0
    assert (p.preemptions, p.steps) == (0, 1)
    assert p.peak_blocks == math.ceil(100 / 16)


def test_empty_instance_decodes_after_first_token(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    p = predict(model, state(), 0, 100, 0, 5)
    # Prefill step 2.0 s, then 4 decode steps of 1 + 0.1 s.
    assert p.ttft == pytest.approx(2.0, rel=1e-12)
    assert p.e2e == pytest.approx(2.0 + 4 * 1.1, rel=1e-12)
    assert p.steps == 5


def test_budget_split_between_decodes_and_chunked_prefill(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward, max_num_batched_tokens=64)
    decoding = (10, 0, 5, 100, 1)
    p = predict(model, state(decoding, decoding, decoding), 3, 100, 0, 1)
    # Step 1: three decodes take 3 tokens of the 64-token budget, the new prompt gets a
    # 61-token chunk: 1 + 61 * 0.01 + 3 * 0.1 = 1.91.  Step 2: the 39 remaining prompt
    # tokens and the three decodes: 1 + 0.39 + 0.3 = 1.69.  First token after step 2.
    assert p.queue_delay == 0.0
    assert p.ttft == pytest.approx(1.91 + 1.69, rel=1e-12)
    assert p.e2e == p.ttft
    assert p.steps == 2


def test_delay_is_the_new_requests_share_of_steps_times_others_in_flight(sim_impl,
                                                                          fast_forward):
    model = make_model(sim_impl, fast_forward)
    assert predict(model, state(), 0, 100, 0, 12).delay == 0.0  # nobody else to slow down
    decoding = (10, 0, 5, 100, 1)
    two = predict(model, state(decoding, decoding), 2, 100, 0, 3)
    # Two decodes far from done; the new request runs 3 steps beside them: its 100-token
    # prefill (100 * 0.01 = 1 s) and two decode sequences (0.1 s each) make both of them
    # 1.2 s later: 2.4 s.
    assert two.delay == pytest.approx(2.4, rel=1e-12)
    long = predict(model, state(decoding, decoding), 2, 100, 0, 40)
    # 39 decode steps (fast-forwarded, in one stretch, or not): 2 * (1 + 39 * 0.1).
    assert long.delay == pytest.approx(2 * (1.0 + 39 * 0.1), rel=1e-12)
    # A request that waits for a slot is delayed too: with 3 slots, an expected arrival at
    # t = 0.1 waits through steps 2 and 3 (step 1 ends at 2.2 s): 2 * 1 + 2 * 3 * 0.1.
    full = make_model(sim_impl, fast_forward, max_num_seqs=3)
    queued = Prediction(*full.predict(state(decoding, decoding), 2, 100, 0, 3, math.inf,
                                      0.2, 10, 0, 10, 1))
    assert queued.delay == pytest.approx(2.6, rel=1e-12)


def test_first_token_delay_counts_only_the_others_before_their_first_token(sim_impl,
                                                                          fast_forward):
    """``decode_delay=0`` (``block_ttft``): a decode's first token is out, so the new
    request's steps delay only the requests still waiting for theirs; at a share in
    between, a decode's delay counts that share."""
    model = make_model(sim_impl, fast_forward)

    def delays(st, n, *arrivals):
        args = (st, n, 100, 0, 3, math.inf, *(arrivals or (math.inf, 0, 0, 0, 0)), 0.0, 1.0,
                math.inf)
        every, first, quarter = (Prediction(*model.predict(*args, share))
                                 for share in (1.0, 0.0, 0.25))
        assert (every.ttft, every.e2e) == (first.ttft, first.e2e)  # only the delay differs
        assert (quarter.ttft, quarter.e2e) == (first.ttft, first.e2e)
        assert quarter.delay == pytest.approx(first.delay + 0.25 * (every.delay - first.delay),
                                              rel=1e-12)
        return every.delay, first.delay

    decoding = (10, 0, 5, 100, 1)
    assert delays(state(decoding, decoding), 2) == (pytest.approx(2.4, rel=1e-12), 0.0)
    # A waiting 50-token prompt is prefilled beside the new one in step 1 (its first token
    # 1 s later for the new request's 100 prefill tokens), then decodes: 2 * 1 + 2 * 2 * 0.1
    # for every request in flight, 1 s for the first tokens.
    waiting = (50, 0, 0, 100, 0)
    every, first = delays(state(decoding, waiting), 2)
    assert every == pytest.approx(2.4, rel=1e-12) and first == pytest.approx(1.0, rel=1e-12)
    # The expected arrival that waits for a slot (3 slots) through steps 2 and 3 has no
    # first token yet: 2 * 0.1 of the 2.6 s.
    full = make_model(sim_impl, fast_forward, max_num_seqs=3)
    model = full
    every, first = delays(state(decoding, decoding), 2, 0.2, 10, 0, 10, 1)
    assert every == pytest.approx(2.6, rel=1e-12) and first == pytest.approx(0.2, rel=1e-12)


def test_sequence_cap_makes_new_request_wait(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward, max_num_seqs=2)
    almost_done = (10, 0, 5, 10, 1)  # 5 more tokens to go
    p = predict(model, state(almost_done, almost_done), 2, 10, 0, 1)
    # Both slots are taken for 5 decode steps of 1 + 2 * 0.1; the new request is
    # admitted at t = 6.0 and its 10-token prefill takes 1 + 0.1.
    assert p.queue_delay == pytest.approx(6.0, rel=1e-12)
    assert p.ttft == pytest.approx(7.1, rel=1e-12)
    assert p.steps == 6


def test_preemption_when_kv_blocks_run_out(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward, num_gpu_blocks=3, block_size=4)
    # A: running decode, 4 prompt tokens + 1 generated (4 computed, 1 block), 2 to go.
    running = (4, 0, 1, 4, 1)
    p = predict(model, state(running), 1, 4, 0, 2)
    # Step 1: A grows to 2 blocks, the new request N is admitted with 1 block (all 3
    # used): 1 + 4 * 0.01 + 0.1 = 1.14, N's first token.
    # Step 2: N needs a 2nd block, none is free: N, the most recently admitted, is
    # preempted (recompute).  Only A runs: 1.1 -> 2.24.
    # Step 3: N (5 tokens to recompute = 2 blocks) does not fit in the 1 free block;
    # A decodes and finishes: 3.34.
    # Step 4: N recomputes 5 tokens and samples its 2nd token: 1 + 0.05 -> 4.39.
    assert p.ttft == pytest.approx(1.14, rel=1e-12)
    assert p.e2e == pytest.approx(4.39, rel=1e-12)
    assert p.queue_delay == 0.0
    assert p.preemptions == 1
    assert p.peak_blocks == 3
    assert p.steps == 4


def test_prefix_cache_hit_shortens_ttft(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    cold = predict(model, state(), 0, 100, 0, 1)
    warm = predict(model, state(), 0, 100, 64, 1)
    # Only the 36 uncached tokens are prefilled: 1 + 0.36.
    assert warm.ttft == pytest.approx(1.36, rel=1e-12)
    assert warm.ttft < cold.ttft
    # A fully cached prompt still computes its last token: 1 + 0.01.
    full = predict(model, state(), 0, 100, 100, 1)
    assert full.ttft == pytest.approx(1.01, rel=1e-12)


def test_request_past_its_prediction_finishes_soon(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward, max_num_seqs=1, past_prediction_tokens=16)
    overdue = (10, 0, 20, 10, 1)  # generated 20 tokens, predicted 10
    p = predict(model, state(overdue), 1, 10, 0, 1)
    # Assumed to run 16 more decode steps of 1.1 s, then the new request's prefill.
    assert p.queue_delay == pytest.approx(16 * 1.1, rel=1e-12)
    assert p.ttft == pytest.approx(16 * 1.1 + 1.1, rel=1e-12)


def test_waiting_requests_are_served_first_come_first_served(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward, max_num_seqs=1)
    queued = (50, 0, 0, 3, 0)  # not started yet: ahead of the new request
    p = predict(model, state(queued), 1, 10, 0, 1)
    # The queued request: prefill (1 + 0.5) and 2 decodes (1.1 each) -> 3.7; then ours.
    assert p.queue_delay == pytest.approx(3.7, rel=1e-12)
    assert p.ttft == pytest.approx(3.7 + 1.1, rel=1e-12)


def test_request_that_never_fits_gives_infinity(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward, num_gpu_blocks=2, block_size=4)
    p = predict(model, state(), 0, 100, 0, 4)
    assert math.isinf(p.ttft) and math.isinf(p.e2e) and math.isinf(p.queue_delay)


def test_speed_scales_every_time(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    base = predict(model, state(), 0, 100, 0, 5)
    model.speed = 2.0
    slow = predict(model, state(), 0, 100, 0, 5)
    assert slow.e2e == pytest.approx(2 * base.e2e, rel=1e-12)


@pytest.mark.parametrize("bad", [(-1, 0, 0, 1, 0), (1, 0, -5, 1, 1), (2**41, 0, 0, 1, 0)])
def test_invalid_state_is_rejected(sim_impl, bad):
    model = make_model(sim_impl, True)
    with pytest.raises(ValueError):
        model.predict(state(bad), 1, 10, 0, 1)


def test_n_larger_than_state_is_rejected(sim_impl):
    model = make_model(sim_impl, True)
    with pytest.raises(ValueError):
        model.predict(state((1, 0, 0, 1, 0)), 2, 10, 0, 1)


def test_invalid_limits_are_rejected(sim_impl):
    with pytest.raises(ValueError):
        sim_impl(0, 8192, 100, 16, FIXED, PREFILL, DECODE)
    with pytest.raises(ValueError):
        sim_impl(8, 8192, 100, 16, -1.0, PREFILL, DECODE)


def test_request_longer_than_the_kv_cache_is_capped_not_preempted_forever(sim_impl,
                                                                          fast_forward):
    # 2 blocks of 4 tokens hold 8 tokens: a 4-token prompt can grow to 5 output tokens
    # (the 5th is sampled, never stored).  Prefill 1 + 0.04, then 4 decodes of 1.1.
    model = make_model(sim_impl, fast_forward, num_gpu_blocks=2, block_size=4)
    p = predict(model, state(), 0, 4, 0, 100)
    assert p.e2e == pytest.approx(1.04 + 4 * 1.1, rel=1e-12)
    assert p.preemptions == 0 and p.peak_blocks == 2


def test_bound_stops_a_simulation_that_can_no_longer_end_within_it(sim_impl, fast_forward):
    """Each token still to come takes a step of at least 1 + 0.01 s (the fixed time and a
    prefill token's share, the lesser of a token's and a sequence's), and before the first
    token the prompt's tokens take at least the fixed time per budget's worth plus 0.01 s
    each: the run stops once its clock plus that passes the bound, long before the clock
    itself does."""
    model = make_model(sim_impl, fast_forward)
    full = predict(model, state(), 0, 100, 0, 5)  # ttft 2.0, e2e 6.4

    def bounded(bound: float) -> Prediction:
        return Prediction(*model.predict(state(), 0, 100, 0, 5, bound))

    assert full.ttft == pytest.approx(2.0, rel=1e-12)
    assert full.e2e == pytest.approx(6.4, rel=1e-12)
    assert bounded(6.4) == full and bounded(10.0) == full  # 6.04, 6.04, ..., 6.31 <= 6.4
    cut = bounded(6.1)  # at 3.1, three tokens to go: 3.1 + 3 * 1.01 > 6.1
    assert cut.ttft == full.ttft and math.isinf(cut.e2e)
    cut = bounded(6.0)  # at once: 1 + 100 * 0.01 for the prompt, 4 * 1.01 after it > 6.0
    assert math.isinf(cut.ttft) and math.isinf(cut.e2e) and cut.steps == 0


def test_score_bound_stops_where_clock_plus_weighted_delay_passes_it(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    decoding = (10, 0, 5, 100, 1)
    st = state(decoding, decoding)
    # Steps end at 2.2, 3.5, 4.8 (the 100-token prefill beside two decodes, then two decode
    # steps of three); the delay after each is 2.0, 2.2, 2.4 (test above).
    full = predict(model, st, 2, 100, 0, 3)

    def bounded(weight: float, score_bound: float) -> Prediction:
        return Prediction(*model.predict(st, 2, 100, 0, 3, math.inf, math.inf, 0, 0, 0, 0,
                                         0.0, weight, score_bound))

    # Where each step starts, the clock plus 1.01 s for each token to come (0 + 3.03,
    # 2.2 + 2.02, 3.5 + 1.01), plus the weighted delay so far (0, 2.0, 2.2): 3.03, 6.22,
    # 6.71 with the weight 1; the end is not checked.
    assert bounded(1.0, 6.8) == full
    assert bounded(0.0, 4.6) == full  # without the weight: 3.03, 4.22, 4.51
    for weight, score_bound in ((1.0, 6.5), (1.0, 6.0), (10.0, 20.0)):
        cut = bounded(weight, score_bound)
        assert cut.ttft == full.ttft and math.isinf(cut.e2e), (weight, score_bound)
    assert math.isinf(bounded(0.0, 3.0).e2e)  # 3.03 > 3.0 at once
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="delay_weight"):
            bounded(bad, math.inf)


def test_shared_blocks_start_free_beside_the_unused_ones(sim_impl, fast_forward):
    # 20 blocks of 16 tokens; a running decode holds 17 (260 tokens computed), so a new
    # 100-token prompt (64 cached) that needs 7 blocks waits until it finishes, unless the
    # 4 blocks of its cached prefix are held once for both (shared_blocks).
    model = make_model(sim_impl, fast_forward, num_gpu_blocks=20)
    running = state((256, 0, 5, 100, 1))
    alone = predict(model, running, 1, 100, 64, 2)
    assert alone.queue_delay > 9.0  # 95 decode steps of 1.1 s first
    model.shared_blocks = 4
    shared = predict(model, running, 1, 100, 64, 2)
    # admitted at once: the decode and its 36 uncached tokens, 1 + 0.1 + 0.36
    assert shared.queue_delay == 0.0
    assert shared.ttft == pytest.approx(1.46, rel=1e-12)
    model.shared_blocks = -3  # nothing shared
    assert predict(model, running, 1, 100, 64, 2) == alone


# ---- expected future arrivals ---------------------------------------------------------------

def predict_with(model, st, n, prompt, cached, output, interval, a_prompt, a_cached, a_output,
                 limit, new_at: float = 0.0) -> Prediction:
    return Prediction(*model.predict(st, n, prompt, cached, output, math.inf, interval,
                                     a_prompt, a_cached, a_output, limit, new_at))


def test_arrival_joins_at_the_next_step_and_slows_the_decode(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    # Alone: prefill 100 tokens (2.0 s), then 4 decode steps of 1.1: e2e 6.4.
    alone = predict(model, state(), 0, 100, 0, 5)
    assert alone.e2e == pytest.approx(6.4, rel=1e-12)
    # One arrival of 50 prompt tokens at 0.5 * 5.0 = 2.5 s: it joins at the start of the
    # step that begins at 3.1 (the first at or after 2.5), which then also prefills its 50
    # tokens: 1 + 0.1 + 0.5 = 1.6.  From then on both decode: 1.2 per step.  The new
    # request's steps: 2.0, 3.1, 4.7 (its 3rd token), 5.9, 7.1 (its 5th): e2e 7.1.
    p = predict_with(model, state(), 0, 100, 0, 5, 5.0, 50, 0, 100, 1)
    assert p.ttft == alone.ttft
    assert p.e2e == pytest.approx(7.1, rel=1e-12)


def test_arrivals_after_the_end_or_none_change_nothing(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    alone = predict(model, state(), 0, 100, 0, 5)
    assert predict_with(model, state(), 0, 100, 0, 5, 100.0, 50, 0, 100, 10) == alone
    assert predict_with(model, state(), 0, 100, 0, 5, 1.0, 50, 0, 100, 0) == alone
    assert predict_with(model, state(), 0, 100, 0, 5, math.inf, 50, 0, 100, 10) == alone


def test_more_arrivals_never_finish_the_request_sooner(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    st = state((300, 0, 4, 40, 1), (200, 0, 0, 30, 0))
    e2e = [predict_with(model, st, 2, 100, 0, 20, interval, 80, 0, 50, 64).e2e
           for interval in (math.inf, 20.0, 5.0, 2.0, 0.5)]
    assert e2e == sorted(e2e) and e2e[-1] > e2e[0]
    capped = [predict_with(model, st, 2, 100, 0, 20, 0.5, 80, 0, 50, limit).e2e
              for limit in (0, 1, 4, 64)]
    assert capped == sorted(capped)


# ---- a late new request (capacity planning) ---------------------------------------------------

def test_a_late_request_on_an_idle_instance_sees_what_it_would_now(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    now = predict(model, state(), 0, 100, 0, 5)
    for new_at in (0.5, 7.0, 1e4):
        late = predict_with(model, state(), 0, 100, 0, 5, math.inf, 0, 0, 0, 0, new_at)
        assert late.ttft == pytest.approx(now.ttft, rel=1e-9)
        assert late.e2e == pytest.approx(now.e2e, rel=1e-9)
        assert late.steps == now.steps


def test_a_late_request_joins_behind_the_arrivals_due_before_it(sim_impl, fast_forward):
    model = make_model(sim_impl, fast_forward)
    # Idle until the arrival at 0.5 * 5.0 = 2.5 s; its prefill of 50 tokens takes
    # 1 + 0.5 = 1.5 s (to 4.0).  The new request arrives at 3.0, during that step, and joins
    # at 4.0 (queue delay 1.0); that step decodes the arrival and prefills the new one's
    # 100 tokens: 1 + 0.1 + 1.0 = 2.1, first token at 6.1 (TTFT 3.1 from its arrival).
    # Then both decode at 1.2 per step: its 5th token at 6.1 + 4 * 1.2 = 10.9 (E2E 7.9).
    p = predict_with(model, state(), 0, 100, 0, 5, 5.0, 50, 0, 100, 1, 3.0)
    assert p.queue_delay == pytest.approx(1.0, rel=1e-12)
    assert p.ttft == pytest.approx(3.1, rel=1e-12)
    assert p.e2e == pytest.approx(7.9, rel=1e-12)


def test_a_late_request_waits_longer_the_longer_an_overload_has_run(sim_impl, fast_forward):
    # An arrival of 400 prompt tokens (5 s of prefill) every 2 s: more than the instance
    # can serve, so the queue, and the late request's wait, grow with its arrival time.
    # (A budget of 512 tokens a step: with 8192, one step of this slow model would take
    # 80 s and batch a whole queue at once.)
    model = make_model(sim_impl, fast_forward, max_num_batched_tokens=512)
    ttft = [predict_with(model, state(), 0, 100, 0, 5, 2.0, 400, 0, 3, 64, at).ttft
            for at in (1.0, 10.0, 40.0, 100.0)]
    assert ttft == sorted(ttft) and ttft[-1] > 20 * ttft[0]
    # at a sustainable rate it does not grow
    easy = [predict_with(model, state(), 0, 100, 0, 5, 20.0, 400, 0, 3, 64, at).ttft
            for at in (41.0, 101.0, 401.0)]
    assert max(easy) == pytest.approx(min(easy), rel=1e-9)
