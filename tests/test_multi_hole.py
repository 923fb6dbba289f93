"""Several holes denoised jointly (model/decoding/multi_hole.py); preview pictures
(model/decoding/preview.py)."""

from __future__ import annotations

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding.multi_hole import (
    hole_logits,
    hole_texts,
    infill_holes,
    multi_preview,
    multi_step,
    new_multi_state,
)
from model.decoding.preview import PLACEHOLDER, expected_steps, hole_preview, state_preview
from model.decoding.sampler import infill
from model.network.published import write_checkpoint
from tests.helpers import sharp_logits, word_token

from .conftest import FAMILY_NAMES

PIECES = ["def add(a, b):\n    ", "\n\n\ndef sub(a, b):\n    ", "\n\nprint(add(1, 2))\n"]


@pytest.fixture(scope="module")
def dreamon(tmp_path_factory):
    from model.network.loader import load_model

    return load_model(write_checkpoint(tmp_path_factory.mktemp("dreamon") / "m", "dreamon"),
                      device="cpu")


def test_preview_draws_masks_as_placeholders_and_stops_at_the_end(tiny_model):
    a, b = word_token(tiny_model, "return"), word_token(tiny_model, "print")
    mask, end = tiny_model.ids.mask, tiny_model.ids.end_of_hole
    text = hole_preview(tiny_model, [a, mask, mask, b, end, b], [False, True, True, False,
                                                                  False, False])
    decoded_a = tiny_model.tokenizer.decode([a])
    decoded_b = tiny_model.tokenizer.decode([b])
    assert text == decoded_a + PLACEHOLDER * 2 + decoded_b


def test_expected_steps():
    assert expected_steps(2, 8, 8) == 4  # 4 a step so far, 8 left: 2 more
    assert expected_steps(3, 3, 0) == 3  # nothing left: done
    assert expected_steps(1, 1, 5, tokens_per_step=2) == 4
    assert expected_steps(2, 5, 9, budget=6) == 6


def test_single_hole_on_step_sees_every_step_but_the_last(tiny_model):
    seen = []
    result = infill(tiny_model, "x = ", "\n", InfillOptions(max_tokens=8, initial_tokens=8,
                                                             threshold=1.0),
                    on_step=lambda state: seen.append(state_preview(tiny_model, state)))
    assert [step for step, _, _ in seen] == list(range(1, result.steps))
    assert all(steps >= step for step, steps, _ in seen)
    assert PLACEHOLDER in seen[0][2]


def test_one_step_commits_across_holes_and_an_end_closes_only_its_hole(tiny_model):
    options = InfillOptions(max_tokens=3, threshold=0.9)
    state = new_multi_state(tiny_model, PIECES, options)
    a, end = word_token(tiny_model, "return"), tiny_model.ids.end_of_hole
    logits = hole_logits(tiny_model, state)
    assert [rows.shape for rows in logits] == [(3, tiny_model.vocab_size)] * 2
    forced = sharp_logits(tiny_model, [a, end, a, a, a, a], 30.0)
    forced[[2, 4, 5]] = 0.0  # hole 0's last and hole 1's last two stay masked this step
    multi_step(tiny_model, state, list(forced.split([3, 3])))
    first, second = state.spans
    assert first.hole.tolist() == [a, end, end] and not first.masked.any()
    assert first.closed_at == 2
    assert second.masked.tolist() == [False, True, True] and second.closed_at is None
    assert not state.finished and state.steps == 1
    step, steps, texts = multi_preview(tiny_model, state)
    assert step == 1 and steps >= 2
    assert texts[1].endswith(PLACEHOLDER * 2) and PLACEHOLDER not in texts[0]


def test_holes_finish_when_no_mask_is_left(tiny_model):
    state = new_multi_state(tiny_model, PIECES, InfillOptions(max_tokens=2))
    a, end = word_token(tiny_model, "return"), tiny_model.ids.end_of_hole
    hole_logits(tiny_model, state)
    multi_step(tiny_model, state, list(sharp_logits(tiny_model, [a, a, end, end], 30.0).split(2)))
    assert state.finish_reason == "max_tokens"  # hole 0 used its whole budget
    texts, counts = hole_texts(tiny_model, state)
    assert texts == [tiny_model.tokenizer.decode([a, a]), ""] and counts == [2, 0]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_fills_several_holes(tiny_models, name):
    model = tiny_models[name]
    seen = []
    result = infill_holes(model, PIECES, InfillOptions(max_tokens=6, threshold=0.5),
                          on_step=lambda state: seen.append(multi_preview(model, state)))
    assert len(result.texts) == 2 and result.finish_reason in ("end", "max_tokens")
    assert 1 <= result.steps <= 12 and len(seen) == result.steps - 1
    for text in result.texts:
        assert PLACEHOLDER not in text and "<|" not in text


def test_should_stop_cancels_between_steps(tiny_model):
    result = infill_holes(tiny_model, PIECES, InfillOptions(max_tokens=8, threshold=1.0),
                          should_stop=lambda: True)
    assert result.finish_reason == "cancelled" and result.steps == 0


def test_dreamon_expand_and_delete_edit_one_hole(dreamon):
    expand, delete = (dreamon.tokenizer.token_to_id(t) for t in ("<|expand|>", "<|delete|>"))
    state = new_multi_state(dreamon, PIECES, InfillOptions(max_tokens=6, initial_tokens=2))
    assert [span.hole.numel() for span in state.spans] == [2, 2]
    a = word_token(dreamon, "return")
    forced = sharp_logits(dreamon, [expand, a, delete, a], 30.0)
    forced[[1, 3]] = 0.0  # only the expand and the delete are committed
    multi_step(dreamon, state, list(forced.split(2)))
    first, second = state.spans
    assert first.hole.tolist() == [dreamon.ids.mask] * 3 and first.masked.all()  # two masks
    assert second.hole.tolist() == [] and second.closed_at == 0  # the delete, the mask after
    result = infill_holes(dreamon, PIECES, InfillOptions(max_tokens=6, initial_tokens=2))
    assert len(result.texts) == 2


def test_fewer_than_two_pieces_is_refused(tiny_model):
    with pytest.raises(ValueError, match="at least two pieces"):
        new_multi_state(tiny_model, ["only text"], InfillOptions())


def test_min_tokens_keeps_every_hole_from_ending_at_once(tiny_model):
    state = new_multi_state(tiny_model, PIECES, InfillOptions(max_tokens=3, min_tokens=1))
    end = tiny_model.ids.end_of_hole
    forced = sharp_logits(tiny_model, [end] * 6, 30.0)
    forced[:, word_token(tiny_model, "return")] = 1.0
    multi_step(tiny_model, state, list(forced.split(3)))
    assert [int(span.hole[0]) != end for span in state.spans] == [True, True]


def test_code_start_keeps_holes_from_starting_with_blank_space(tiny_model):
    state = new_multi_state(tiny_model, PIECES, InfillOptions(max_tokens=2, tokens_per_step=4),
                            code_start=True)
    space = tiny_model.tokenizer.encode("\n", add_special_tokens=False).ids[0]
    forced = sharp_logits(tiny_model, [space] * 4, 30.0)
    forced[:, word_token(tiny_model, "return")] = 1.0
    multi_step(tiny_model, state, list(forced.split(2)))
    assert [int(span.hole[0]) for span in state.spans] == [word_token(tiny_model, "return")] * 2
    assert int(state.spans[0].hole[1]) == space  # later positions may be blank


def test_several_holes_follow_the_options_rule(tiny_model):
    """The rule of `options.algorithm` ranks positions across the holes, as for one hole: under
    topk_margin, a position torn between two tokens (p = 0.5 each, margin 0) is not committed,
    although its confidence passes the threshold (the old joint step ranked by confidence)."""
    a, b = word_token(tiny_model, "return"), word_token(tiny_model, "print")
    state = new_multi_state(tiny_model, PIECES, InfillOptions(max_tokens=2, threshold=0.4,
                                                              algorithm="topk_margin"))
    forced = torch.zeros(4, tiny_model.vocab_size)
    forced[0, [a, b]] = 30.0  # torn: confidence 0.5, margin 0
    forced[3, a] = 3.0  # unsure (p ~ 0.05) but the widest margin
    multi_step(tiny_model, state, list(forced.split(2)))
    first, second = state.spans
    assert first.masked.tolist() == [True, True]
    assert second.masked.tolist() == [True, False] and int(second.hole[1]) == a


def test_several_holes_refuse_a_step_budget(tiny_model):
    with pytest.raises(ValueError, match="schedule one hole"):
        new_multi_state(tiny_model, PIECES, InfillOptions(max_tokens=4, steps=2))


def test_several_holes_cut_at_stop_words_as_one_hole_does(tiny_model):
    a, b = word_token(tiny_model, "return"), word_token(tiny_model, "print")
    stop = tiny_model.tokenizer.decode([b])
    state = new_multi_state(tiny_model, PIECES, InfillOptions(max_tokens=3, stop=(stop,)))
    multi_step(tiny_model, state, list(sharp_logits(tiny_model, [a, b, a, a, a, a],
                                                    30.0).split(3)))
    texts, _ = hole_texts(tiny_model, state)
    assert texts[0] == tiny_model.tokenizer.decode([a])
    assert state.spans[0].finish_reason == "stop"
