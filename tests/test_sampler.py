"""The masked-diffusion sampler: commits, variable length, stops, determinism."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding.hole import layout_ids
from model.decoding.passes import forward_holes
from model.decoding.sampler import apply_step, infill, new_state
from model.decoding.schedules import transfer_fraction, uniform_counts
from model.decoding.scoring import filter_logits, score_logits, select_commits
from tests.helpers import sharp_logits, word_token

from .conftest import FAMILY_NAMES

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_committed_tokens_never_change(tiny_models, name):
    model = tiny_models[name]
    result = infill(model, PREFIX, SUFFIX, InfillOptions(max_tokens=24, threshold=0.02))
    mask = model.ids.mask
    for before, after in zip(result.trace, result.trace[1:], strict=False):
        for position, token in enumerate(before.hole):
            if token != mask:
                assert after.hole[position] == token


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_forward_passes_never_exceed_hole_tokens(tiny_models, name):
    model = tiny_models[name]
    for threshold in (0.0, 0.05, 0.9, 1.0):
        result = infill(model, PREFIX, SUFFIX, InfillOptions(max_tokens=20, threshold=threshold))
        assert 1 <= result.steps <= len(result.trace[-1].hole)


def test_threshold_one_commits_one_token_per_step(tiny_model):
    result = infill(tiny_model, PREFIX, SUFFIX, InfillOptions(max_tokens=12, threshold=1.0))
    assert all(len(step.committed) == 1 for step in result.trace)
    assert result.steps == 12


def test_low_threshold_commits_many_tokens_per_step(tiny_model):
    result = infill(tiny_model, PREFIX, SUFFIX,
                    InfillOptions(max_tokens=16, initial_tokens=16, threshold=0.0))
    assert result.steps == 1
    assert len(result.trace[0].committed) == 16


def test_fixed_tokens_per_step(tiny_model):
    result = infill(tiny_model, PREFIX, SUFFIX,
                    InfillOptions(max_tokens=16, initial_tokens=16, tokens_per_step=4))
    assert [len(step.committed) for step in result.trace] == [4, 4, 4, 4]


def test_end_of_hole_token_shortens_the_hole(tiny_model):
    model = tiny_model
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, threshold=0.5))
    word = word_token(model, "x")
    end = model.ids.end_of_hole
    apply_step(model, state, sharp_logits(model, [word, word, end, word, word, word, word, word]))
    assert state.finished and state.finish_reason == "end"
    assert state.steps == 1
    text = model.tokenizer.decode([word, word])
    from model.decoding.hole import final_text

    assert final_text(model, state) == (text, 2)


def test_positions_chosen_after_an_end_in_the_same_step_stay_end_of_hole(tiny_model):
    """An end closes the hole at once: the model never sees text after an end it committed
    (several holes always did this; one hole committed those positions' tokens)."""
    model = tiny_model
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=6, threshold=0.5))
    word, end = word_token(model, "x"), model.ids.end_of_hole
    logits = sharp_logits(model, [word, end, word, word, word, word])
    logits[0] = 0.0
    logits[0, word] = 1.0  # position 0 stays masked (unsure of its word): not finished
    apply_step(model, state, logits)
    assert state.hole.tolist()[1:] == [end] * 5 and state.masked.tolist() == [True] + [False] * 5
    assert [position for position, _ in state.trace[0].committed] == [1]


def test_end_token_closes_later_masks_without_a_step(tiny_model):
    """End committed at position 1 (alone): positions 2.. need no forward pass."""
    model = tiny_model
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, threshold=1.0))
    end = model.ids.end_of_hole
    logits = sharp_logits(model, [word_token(model, "x")] * 8, confidence=1.0)
    logits[1, end] = 50.0  # the most confident position says "hole ends here"
    apply_step(model, state, logits)
    assert state.masked.tolist() == [True] + [False] * 7
    assert not state.finished
    apply_step(model, state, sharp_logits(model, [word_token(model, "y")]))
    assert state.finish_reason == "end" and state.steps == 2


def test_full_hole_is_extended(tiny_model):
    model = tiny_model
    options = InfillOptions(initial_tokens=4, extend_by=3, max_tokens=10, threshold=0.5)
    state = new_state(model, PREFIX, SUFFIX, options)
    word = word_token(model, "x")
    apply_step(model, state, sharp_logits(model, [word] * 4))
    assert not state.finished
    assert state.hole.numel() == 7 and int(state.masked.sum()) == 3
    apply_step(model, state, sharp_logits(model, [word] * 3))
    assert state.hole.numel() == 10
    apply_step(model, state, sharp_logits(model, [word] * 3))
    assert state.finish_reason == "max_tokens" and state.hole.numel() == 10


def test_single_line_stops_at_newline(tiny_model):
    model = tiny_model
    state = new_state(model, PREFIX, SUFFIX,
                      InfillOptions(initial_tokens=6, threshold=0.5, single_line=True))
    word, newline = word_token(model, "x"), word_token(model, "\n")
    apply_step(model, state, sharp_logits(model, [word, newline, word, word, word, word]))
    from model.decoding.hole import final_text

    assert state.finish_reason == "newline"
    assert final_text(model, state)[0] == model.tokenizer.decode([word])


def test_stop_word_ends_the_text(tiny_model):
    model = tiny_model
    state = new_state(model, PREFIX, SUFFIX,
                      InfillOptions(initial_tokens=4, threshold=0.5, stop=("x",)))
    a, x = word_token(model, "a"), word_token(model, "x")
    apply_step(model, state, sharp_logits(model, [a, x, a, a]))
    from model.decoding.hole import final_text

    assert state.finish_reason == "stop"
    assert final_text(model, state)[0] == "a"


def test_same_input_same_output(tiny_model):
    options = InfillOptions(max_tokens=16, threshold=0.05)
    first = infill(tiny_model, PREFIX, SUFFIX, options)
    second = infill(tiny_model, PREFIX, SUFFIX, options)
    assert (first.text, first.steps) == (second.text, second.steps)
    sampled = InfillOptions(max_tokens=16, temperature=1.0, seed=7)
    assert infill(tiny_model, PREFIX, SUFFIX, sampled).text == \
        infill(tiny_model, PREFIX, SUFFIX, sampled).text


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_batched_and_unbatched_logits_agree(tiny_models, name):
    model = tiny_models[name]
    holes = [("x = ", "\n"), (PREFIX, SUFFIX), ("import os\nimport sys\n\n\ndef main():\n", "")]
    states = [new_state(model, p, s, InfillOptions(initial_tokens=5 + i))
              for i, (p, s) in enumerate(holes)]
    batched = forward_holes(model, states)
    for state, rows in zip(states, batched, strict=True):
        (alone,) = forward_holes(model, [state])
        torch.testing.assert_close(rows, alone, atol=1e-4, rtol=1e-4)
        assert torch.equal(rows.argmax(-1), alone.argmax(-1))


def test_scores_are_in_unit_interval():
    logits = torch.randn(5, 50)
    for score in ("confidence", "margin", "entropy"):
        _, scores = score_logits(logits, score, 0.0, None)
        assert ((scores >= 0) & (scores <= 1)).all()


def test_select_commits_at_least_one():
    chosen = select_commits(torch.tensor([0.1, 0.3, 0.2]), InfillOptions(threshold=0.9))
    assert chosen.tolist() == [1]
    chosen = select_commits(torch.tensor([0.95, 0.3, 0.99]), InfillOptions(threshold=0.9))
    assert sorted(chosen.tolist()) == [0, 2]


def test_unknown_score_lists_known_ones():
    with pytest.raises(ValueError, match="confidence, margin, entropy"):
        InfillOptions(score="vibes")


def test_should_stop_leaves_before_next_step(tiny_model):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    result = infill(tiny_model, PREFIX, SUFFIX, InfillOptions(max_tokens=32, threshold=1.0),
                    should_stop=should_stop)
    assert result.steps == 3 and result.finish_reason == "cancelled"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_hole_only_pass_matches_the_full_pass_on_unchanged_context(tiny_models, name):
    """Right after a full pass nothing is stale: running the hole alone gives the same logits."""
    model = tiny_models[name]
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=6, refresh_every=0))
    (full,) = forward_holes(model, [state])
    assert state.full_passes == 1 and state.context is not None
    (cached,) = forward_holes(model, [state])
    assert state.full_passes == 1  # the second pass ran the hole only
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_refresh_every_step_is_the_uncached_sampler(tiny_model):
    options = InfillOptions(max_tokens=16, threshold=0.05)
    uncached = infill(tiny_model, PREFIX, SUFFIX,
                      InfillOptions(max_tokens=16, threshold=0.05, reuse_context=False))
    always = infill(tiny_model, PREFIX, SUFFIX,
                    InfillOptions(max_tokens=16, threshold=0.05, refresh_every=1))
    assert (uncached.text, uncached.steps) == (always.text, always.steps)
    assert uncached.full_passes == uncached.steps
    cached = infill(tiny_model, PREFIX, SUFFIX, options)
    assert cached.full_passes < cached.steps


def test_growing_the_hole_forces_a_full_pass(tiny_model):
    model = tiny_model
    options = InfillOptions(initial_tokens=4, extend_by=4, max_tokens=8, threshold=0.5,
                            refresh_every=0)
    state = new_state(model, PREFIX, SUFFIX, options)
    word = word_token(model, "x")
    forward_holes(model, [state])
    apply_step(model, state, sharp_logits(model, [word] * 4))  # full: grows to 8
    forward_holes(model, [state])
    assert state.full_passes == 2


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_batched_hole_only_passes_agree_with_single_ones(tiny_models, name):
    model = tiny_models[name]
    holes = [("x = ", "\n"), (PREFIX, SUFFIX), ("import os\nimport sys\n\n\ndef main():\n", "")]
    states = [new_state(model, p, s, InfillOptions(initial_tokens=4 + 3 * i, refresh_every=0))
              for i, (p, s) in enumerate(holes)]
    forward_holes(model, states)  # full passes fill the caches
    batched = forward_holes(model, states)  # hole-only, batched
    assert all(s.full_passes == 1 for s in states)
    for state, rows in zip(states, batched, strict=True):
        (alone,) = forward_holes(model, [state])
        torch.testing.assert_close(rows, alone, atol=1e-4, rtol=1e-4)


def test_min_tokens_forbids_ending_the_hole_at_its_start(tiny_model):
    model = tiny_model
    end, newline = model.ids.end_of_hole, word_token(model, "\n")
    for options, first in ((InfillOptions(initial_tokens=4, threshold=0.5, min_tokens=1), end),
                           (InfillOptions(initial_tokens=4, threshold=0.5, min_tokens=1,
                                          single_line=True), newline)):
        state = new_state(model, PREFIX, SUFFIX, options)
        apply_step(model, state, sharp_logits(model, [first, end, end, end]))
        assert int(state.hole[0]) != first  # the runner-up token instead
        assert state.closed_at == 2  # position 1 may end the hole
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=4, threshold=0.5))
    apply_step(model, state, sharp_logits(model, [end, end, end, end]))
    assert state.closed_at == 1 and int(state.hole[0]) == end  # without: empty is allowed


def graded_end_logits(model, words: int, ends: int) -> torch.Tensor:
    """`words` positions sure of "x", then `ends` positions whose best token is the end token,
    surer towards the back of the hole (as a model that knows the hole is short)."""
    logits = sharp_logits(model, [word_token(model, "x")] * (words + ends), confidence=1.0)
    for index in range(ends):
        logits[words + index, model.ids.end_of_hole] = 2.0 + index
    return logits


def test_an_end_commits_the_run_of_predicted_ends_before_it(tiny_model):
    model = tiny_model
    one_a_step = InfillOptions(initial_tokens=8, threshold=1.0)
    state = new_state(model, PREFIX, SUFFIX, one_a_step)
    apply_step(model, state, graded_end_logits(model, words=2, ends=6))
    assert state.closed_at == 3 and int(state.hole[2]) == model.ids.end_of_hole
    assert state.masked.tolist() == [True, True] + [False] * 6  # one step, not six
    state = new_state(model, PREFIX, SUFFIX, replace(one_a_step, end_runs=False))
    apply_step(model, state, graded_end_logits(model, words=2, ends=6))
    assert state.masked.tolist() == [True] * 7 + [False]  # the back position alone


def test_an_end_run_stops_at_a_committed_token(tiny_model):
    model = tiny_model
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, threshold=1.0))
    state.hole[4], state.masked[4] = word_token(model, "y"), False
    logits = graded_end_logits(model, words=2, ends=6)
    apply_step(model, state, torch.cat([logits[:4], logits[5:]]))  # rows of masked positions
    assert state.closed_at == 6  # the run 5..7 only: position 4 holds a real token
    assert state.masked.tolist() == [True] * 4 + [False] * 4


# ---------------------------------------------------------------------------------------------
# Reference samplers: Dream's and LLaDA's settings, and exact mode against a reference loop


def test_unknown_algorithm_lists_known_ones():
    with pytest.raises(ValueError, match="maskgit_plus, topk_margin, entropy, origin, "
                                         "low_confidence, random"):
        InfillOptions(algorithm="greedy")


def test_reference_settings_are_checked():
    with pytest.raises(ValueError, match="multiple of block_length"):
        InfillOptions(steps=8, max_tokens=10, block_length=4)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        InfillOptions(steps=6, max_tokens=16, block_length=4)
    with pytest.raises(ValueError, match="origin' needs steps"):
        InfillOptions(algorithm="origin")
    with pytest.raises(ValueError, match="not both"):
        InfillOptions(steps=4, tokens_per_step=2)


def test_llada_counts_spread_a_blocks_masks_remainder_first():
    assert uniform_counts(10, 4) == [3, 3, 2, 2]
    assert uniform_counts(3, 4) == [1, 1, 1, 0]


def test_dream_schedule_commits_what_its_timesteps_say():
    """One token a step (steps == masks): the first step's share rounds down to none and the
    last commits the rest; every step in between commits one."""
    counts = []
    masks, steps = 8, 8
    for step in range(steps):
        fraction = transfer_fraction(step, steps)
        count = masks if step == steps - 1 else int(torch.tensor(float(masks)) * fraction)
        counts.append(count)
        masks -= count
    assert counts[0] == 0 and sum(counts) == 8 and counts[-1] >= 1


def test_a_step_budget_fills_a_fixed_hole_without_idle_passes(tiny_models):
    model = tiny_models["dream"]
    options = InfillOptions(max_tokens=8, steps=8, algorithm="entropy", exact=True)
    state = new_state(model, PREFIX, SUFFIX, options)
    assert state.hole.numel() == 8 and state.block_step == 1  # step 0 commits none: skipped
    result = infill(model, PREFIX, SUFFIX, options)
    assert all(step.committed for step in result.trace)
    assert result.steps <= 7


def test_blocks_are_decoded_left_to_right(tiny_models):
    model = tiny_models["llada"]
    options = InfillOptions(max_tokens=12, steps=6, block_length=4, algorithm="low_confidence",
                            exact=True)
    result = infill(model, PREFIX, SUFFIX, options)
    mask = model.ids.mask
    for step in result.trace:
        filled = [token != mask for token in step.hole]
        for block in range(1, 3):  # a later block starts only once the earlier ones are full
            if any(filled[block * 4:(block + 1) * 4]):
                assert all(filled[: block * 4])
        assert len(step.committed) == 2  # 4 masks over 2 steps per block


def test_top_p_and_top_k_keep_the_likeliest_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    lowest = torch.finfo(logits.dtype).min
    kept = filter_logits(logits, top_p=0.7, top_k=0) > lowest
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 crosses 0.7
    kept = filter_logits(logits, top_p=1.0, top_k=3) > lowest
    assert kept.tolist() == [[True, True, True, False]]


def test_cfg_scale_runs_an_unconditioned_pass_with_the_prompt_masked(tiny_models):
    model = tiny_models["llada"]
    options = InfillOptions(max_tokens=6, steps=6, algorithm="low_confidence", cfg_scale=1.0)
    state = new_state(model, PREFIX, SUFFIX, options)
    (guided,) = forward_holes(model, [state])
    plain_state = new_state(model, PREFIX, SUFFIX, replace(options, cfg_scale=0.0))
    (plain,) = forward_holes(model, [plain_state])
    mask = model.ids.mask
    twin = new_state(model, "", "", replace(options, cfg_scale=0.0))
    twin.prefix_ids = [mask] * len(plain_state.prefix_ids)
    twin.suffix_ids = [mask] * len(plain_state.suffix_ids)
    (unguided,) = forward_holes(model, [twin])
    torch.testing.assert_close(guided, unguided + 2.0 * (plain - unguided))
    assert state.guidance_passes == 1 and state.steps == 0


def _dream_sample(logits, temperature, top_p, top_k, generator):
    """Dream's sample_tokens: logits / T, top_p, top_k, softmax; sample or take the max."""
    if temperature > 0:
        logits = logits / temperature
    logits = filter_logits(logits, top_p, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(-1)
    return probs, tokens


def reference_loop(model, prefix, suffix, algorithm, gen_length, steps, block_length=None,
                   temperature=0.0, top_p=1.0, top_k=0, alg_temp=0.0, cfg_scale=0.0, seed=0):
    """Dream's `_sample` and LLaDA's `generate`, written out from their published code with a
    full forward pass over the whole sequence every step. The hole after every step.

    Random draws come from one generator, tokens first and then positions, for the current
    block's masked positions in order (the references draw over whole rows, where the other
    entries cannot be drawn: the same distributions); a step that commits no position is
    skipped without drawing (the sampler under test documents the same conventions).
    """
    prefix_ids, suffix_ids = layout_ids(model, prefix, suffix)
    mask, start = model.ids.mask, len(prefix_ids)
    x = torch.tensor(prefix_ids + [mask] * gen_length + suffix_ids)
    prompt = x != mask
    generator = torch.Generator().manual_seed(seed)
    block_length = block_length or gen_length
    blocks = gen_length // block_length
    per_block = steps // blocks
    times = torch.linspace(1, 1e-3, per_block + 1)
    history = []
    for block in range(blocks):
        in_block = torch.zeros_like(prompt)
        in_block[start + block * block_length: start + (block + 1) * block_length] = True
        block_masks = int((x[in_block] == mask).sum())
        llada_counts = [block_masks // per_block + (1 if i < block_masks % per_block else 0)
                        for i in range(per_block)]
        for i in range(per_block):
            candidates = (x == mask) & in_block
            n = int(candidates.sum())
            t, s = times[i], times[i + 1]
            if algorithm in ("low_confidence", "random"):
                count = llada_counts[i]
            elif algorithm != "origin":
                count = int(torch.tensor(float(n)) * (1 - s / t)) if i < per_block - 1 else n
            if algorithm != "origin" and count == 0:
                continue
            with torch.inference_mode():
                logits = model.network(x[None]).logits[0].float()  # (L, V)
                if cfg_scale > 0:
                    unprompted = x.clone()
                    unprompted[prompt] = mask
                    un = model.network(unprompted[None]).logits[0].float()
                    logits = un + (cfg_scale + 1) * (logits - un)
            if model.family.shifted_logits:
                logits = torch.cat([logits[:1], logits[:-1]])
            rows = logits[candidates]  # (n, V)
            if algorithm in ("low_confidence", "random"):
                if temperature > 0:
                    rows64 = rows.to(torch.float64)
                    u = torch.rand(rows64.shape, dtype=torch.float64, generator=generator)
                    tokens = (rows64.exp() / (-torch.log(u)) ** temperature).argmax(-1)
                else:
                    tokens = rows.argmax(-1)
                if algorithm == "low_confidence":
                    scores = torch.softmax(rows, -1).gather(-1, tokens[:, None]).squeeze(-1)
                else:
                    scores = torch.rand(n, generator=generator)
            else:
                probs, tokens = _dream_sample(rows, temperature, top_p, top_k, generator)
                if algorithm == "entropy":
                    scores = (probs * torch.log(probs + 1e-10)).sum(-1)
                elif algorithm == "topk_margin":
                    top2 = probs.sort(-1, descending=True).values
                    scores = top2[:, 0] - top2[:, 1]
                else:
                    scores = probs.gather(-1, tokens[:, None]).squeeze(-1)
            proposal = torch.full_like(x, mask)
            proposal[candidates] = tokens
            if algorithm == "origin":
                chance = 1 - s / t if i < per_block - 1 else 1
                transfer = torch.zeros_like(prompt)
                transfer[candidates] = torch.rand(n, generator=generator) < chance
                x[transfer] = proposal[transfer]
            else:
                full = torch.full(x.shape, -torch.inf)
                full[candidates] = scores
                if alg_temp > 0:  # Dream's row is 0 off the candidates: the same distribution
                    weights = torch.softmax(scores / alg_temp, -1)
                    drawn = torch.multinomial(weights, count, generator=generator)
                    chosen = candidates.nonzero().squeeze(-1)[drawn]
                else:
                    chosen = torch.topk(full, count).indices
                x[chosen] = proposal[chosen]
            history.append(x[start: start + gen_length].tolist())
    return history


def _distinct(holes: list[list[int]]) -> list[list[int]]:
    return [hole for i, hole in enumerate(holes) if i == 0 or hole != holes[i - 1]]


REFERENCE_CASES = [  # (family, settings, seed): every setting once, the sampled ones twice
    ("dream", dict(algorithm="entropy", steps=12), 0),  # one token a step
    ("dream", dict(algorithm="entropy", steps=6, temperature=0.2, top_p=0.95), 1),  # DiffuCoder
    ("dream", dict(algorithm="entropy", steps=6, temperature=0.2, top_p=0.95), 2),
    ("dream", dict(algorithm="maskgit_plus", steps=4, alg_temp=0.5), 2),
    ("dream", dict(algorithm="topk_margin", steps=5, top_k=20), 0),
    ("dream", dict(algorithm="origin", steps=6, temperature=0.5), 1),
    ("llada", dict(algorithm="low_confidence", steps=6, block_length=4), 2),
    ("llada", dict(algorithm="random", steps=12, block_length=6, temperature=0.7), 0),
    ("llada", dict(algorithm="random", steps=12, block_length=6, temperature=0.7), 1),
    ("llada", dict(algorithm="low_confidence", steps=4, cfg_scale=0.5), 0),
    ("default", dict(algorithm="low_confidence", steps=6, temperature=1.0), 1),
]


@pytest.mark.parametrize(("name", "settings", "seed"), REFERENCE_CASES)
def test_exact_mode_reproduces_the_reference_trajectory(tiny_models, name, settings, seed):
    model = tiny_models[name]
    prefix, suffix = [(PREFIX, SUFFIX), ("x = ", "\n"), ("import os\n", "\n\nos.")][seed]
    gen_length = 12
    options = InfillOptions(max_tokens=gen_length, exact=True, seed=seed, **settings)
    result = infill(model, prefix, suffix, options)
    reference = _distinct(reference_loop(model, prefix, suffix, gen_length=gen_length,
                                         seed=seed, **settings))
    ours = _distinct([step.hole for step in result.trace])
    assert ours == reference[: len(ours)]
    assert result.finish_reason in ("end", "max_tokens")
    if result.finish_reason == "max_tokens":
        assert len(ours) == len(reference)
    final = reference[-1]
    ends = [i for i, token in enumerate(final) if token == model.ids.end_of_hole
            or token in model.ids.extra_end]
    expected = model.tokenizer.decode(final[: ends[0]] if ends else final,
                                      skip_special_tokens=False)
    assert result.text == expected


def test_exact_mode_lets_the_hole_end_at_once_as_the_references_do(tiny_model):
    model = tiny_model
    end = model.ids.end_of_hole
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(max_tokens=4, threshold=0.5,
                                                           min_tokens=1, exact=True))
    apply_step(model, state, sharp_logits(model, [end, end, end, end]))
    assert state.hole.tolist() == [end] * 4 and state.finish_reason == "end"
    assert state.closed_at is None  # nothing was closed: every position was decoded


def test_finishing_a_hole_is_asked_apart_from_growing_it(tiny_model):
    """`why_finished` only says; `finish_or_grow` grows a hole full of unfinished text."""
    from model.decoding.hole import finish_or_grow, why_finished

    model = tiny_model
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=4, max_tokens=16))
    word = word_token(model, "x")
    state.hole[:] = word
    state.masked[:] = False
    assert why_finished(model, state) is None and state.hole.numel() == 4
    finish_or_grow(model, state)
    assert state.hole.numel() == 4 + state.options.extend_by and not state.finished


def test_banning_on_another_device_leaves_the_models_ids_where_they_are(tiny_model):
    """Logits elsewhere (a GPU; here the meta device) get their own copy of the never-sampled
    ids, kept per device; the model's own stay on its device for every other caller."""
    from model.decoding.scoring import sampleable

    state = new_state(tiny_model, PREFIX, SUFFIX, InfillOptions())
    with torch.inference_mode():
        logits = torch.zeros((2, tiny_model.vocab_size), device="meta")
    sampleable(tiny_model, state, logits)
    assert tiny_model.never_sample_ids.device.type == "cpu"
    assert tiny_model.never_sample_on(torch.device("meta")).device.type == "meta"
    assert tiny_model.never_sample_on(torch.device("meta")) is tiny_model.never_sample_on(
        torch.device("meta"))
