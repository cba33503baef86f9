"""The multi-term memory: frame indices, the buffer, the anchor rule, copies and the saved form."""

import pytest
import torch

from helios.sampling.history import History


def latents(frames, value=None, seed=0):
    if value is not None:
        return torch.full((1, 2, frames, 2, 2), float(value))
    return torch.randn(1, 2, frames, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_indices_are_the_released_layout():
    idx = History.empty(1, 2, 2, 2).indices(9)
    assert idx["indices_latents_history_long"].tolist() == [list(range(1, 17))]
    assert idx["indices_latents_history_mid"].tolist() == [[17, 18]]
    assert idx["indices_latents_history_short"].tolist() == [[0, 19]]  # [anchor, last frame]
    assert idx["indices_hidden_states"].tolist() == [list(range(20, 29))]


def test_without_the_anchor_the_short_term_is_the_last_two_frames():
    history = History.empty(1, 2, 2, 2, keep_first_frame=False)
    assert history.sizes == (16, 2, 2) and history.capacity == 20
    idx = history.indices(9)
    assert idx["indices_latents_history_short"].tolist() == [[18, 19]]
    history.add_chunk(latents(9, 1.0), 0)
    assert history.anchor is None


def test_append_keeps_the_most_recent_frames():
    history = History.empty(1, 2, 2, 2)
    chunks = [latents(9, k + 1) for k in range(3)]
    for chunk in chunks:
        history.append(chunk)
    assert history.latents.shape[2] == 19
    assert torch.equal(history.latents, torch.cat(chunks, dim=2)[:, :, -19:])


def test_the_anchor_is_the_first_latent_of_chunk_0():
    history = History.empty(1, 2, 2, 2)
    first, second = latents(9, seed=1), latents(9, seed=2)
    history.add_chunk(first, 0)
    history.add_chunk(second, 1)
    assert torch.equal(history.anchor, first[:, :, :1])
    short = history.terms(torch.float32)["latents_history_short"]
    assert torch.equal(short, torch.cat([first[:, :, :1], second[:, :, -1:]], dim=2))


def test_skip_first_chunk_takes_the_anchor_from_chunk_1_and_an_input_anchor_stays():
    history = History.empty(1, 2, 2, 2)
    first, second = latents(9, seed=1), latents(9, seed=2)
    history.add_chunk(first, 0, skip_first_chunk=True)
    history.add_chunk(second, 1, skip_first_chunk=True)
    assert torch.equal(history.anchor, second[:, :, :1])

    given = latents(1, 7.0)  # I2V / V2V: the input's latent is the anchor
    history = History.empty(1, 2, 2, 2)
    history.anchor = given
    history.add_chunk(first, 0)
    assert torch.equal(history.anchor, given)


def test_a_missing_anchor_is_zeros_in_the_model_inputs():
    terms = History.empty(1, 2, 2, 2).terms(torch.bfloat16)
    assert {k: tuple(v.shape[2:3]) for k, v in terms.items()} == {
        "latents_history_long": (16,), "latents_history_mid": (2,), "latents_history_short": (2,)}
    assert all(v.dtype == torch.bfloat16 and not v.any() for v in terms.values())


def test_copy_is_independent():
    history = History.empty(1, 2, 2, 2)
    history.add_chunk(latents(9, seed=1), 0)
    snapshot = history.copy()
    before = snapshot.latents.clone(), snapshot.anchor.clone()
    history.add_chunk(latents(9, seed=2), 1)
    history.latents.add_(1)  # even in-place changes of the original do not reach the copy
    history.anchor.add_(1)
    assert torch.equal(snapshot.latents, before[0]) and torch.equal(snapshot.anchor, before[1])


def test_state_dict_round_trip():
    history = History.empty(1, 2, 2, 2, sizes=(4, 2, 1))
    history.add_chunk(latents(9, seed=3), 0)
    again = History.from_state_dict(history.state_dict())
    assert torch.equal(again.latents, history.latents) and torch.equal(again.anchor, history.anchor)
    assert (again.sizes, again.keep_first_frame) == (history.sizes, history.keep_first_frame)


@pytest.mark.parametrize("sizes", [(16, 2), (16, 0, 1), (16, -2, 1)])
def test_bad_sizes_are_refused(sizes):
    with pytest.raises(ValueError, match="history_sizes must be three positive ints"):
        History.empty(1, 2, 2, 2, sizes=sizes)
