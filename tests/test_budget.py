"""The step budget (frontend/engine/budget.py): how many prompt tokens a step may carry next to
decoding slots, from measured step times, so that a long prompt slows running streams by a
bounded factor instead of stalling them for its whole prefill."""
from __future__ import annotations

from llamarpc.frontend.engine.budget import StepBudget


def test_no_decoding_slot_takes_the_whole_batch():
    b = StepBudget(512)
    assert b.prompt_tokens(0) == 512
    b.observe(4, 0, 0.010)
    assert b.prompt_tokens(0) == 512


def test_chunk_keeps_a_step_near_stall_factor_decode_steps():
    b = StepBudget(512, stall_factor=1.4)
    b.observe(4, 0, 0.010)              # a decode-only step of 4 slots: 10 ms
    b.observe(4, 50, 0.010 + 50 * 1e-4)  # beside them, 0.1 ms per prompt token
    n = b.prompt_tokens(4)
    assert n in (39, 40)                  # (1.4 - 1) x 10 ms of prompt work, give or take a rounding
    assert 0.010 + n * 1e-4 <= 1.4 * 0.010 + 1e-9


def test_before_any_measurement_and_at_the_extremes():
    b = StepBudget(512)
    assert b.prompt_tokens(3) == 32                 # nothing measured yet: a small fixed chunk
    b.observe(3, 0, 0.010)
    b.observe(0, 100, 0.010)                        # only prompt-only steps measured: 1.5x their cost
    assert b.prompt_tokens(3) == int((b.stall_factor - 1.0) * 0.010 / (1.5 * b.prefill_tok_s)) == 26
    b.observe(3, 10, 10.0)                          # prompt tokens very dear: never below min_chunk
    assert b.prompt_tokens(3) == b.min_chunk
    assert StepBudget(20).prompt_tokens(18) <= 2    # never beyond the batch


def test_fixed_chunk_and_decode_time_between_measured_sizes():
    assert StepBudget(512, fixed_chunk=16).prompt_tokens(4) == 16
    b = StepBudget(512)
    b.observe(2, 0, 0.006)
    assert b.decode_time(5) == 0.006 * 6 / 3        # scaled from the nearest measured size
