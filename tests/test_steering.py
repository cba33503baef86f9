"""Steering a running stream: prompt changes at chunk boundaries, equal to prompt schedules, resumable."""

import threading

import pytest
import torch

from helios import HeliosPipeline, SamplingOptions
from helios import Steering
from helios.pipeline.tiny import build_tiny_model

H, W = 64, 64  # the smallest size the tiny distilled model takes: the tiny VAE's decode dominates
FAST = dict(height=H, width=W, pyramid_num_inference_steps_list=(1, 1, 1), is_amplify_first_chunk=False, seed=3)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "distilled", variant="distilled", seed=0)
    return HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


def _steered(pipe, opts, changes, **kwargs):
    """Run a stream, calling steering.set(*changes[k]) once chunk k - 1 is out (so it applies at chunk k)."""
    steering = Steering()
    chunks = []
    for chunk in pipe.stream("a red cat", opts, steering=steering, **kwargs):
        chunks.append(chunk)
        for args in changes.get(chunk.index + 1, []):
            steering.set(*args)
    return chunks, steering


@pytest.mark.slow
@pytest.mark.parametrize("at, transition, n", [(2, 2, 3), (1, 0, 2)])
def test_steering_at_chunk_k_gives_the_frames_of_the_equivalent_schedule(pipe, at, transition, n):
    opts = SamplingOptions(num_frames=33 * n, **FAST)
    steered, _ = _steered(pipe, opts, {at: [("a blue dog", transition)]})
    # A change at chunk k over N chunks = the schedule's blend with N + 1 steps started at chunk k - 1 (steering.py)
    if transition == 0:
        schedule, steps = [("a red cat", at), ("a blue dog", n - at)], 1
    else:
        schedule, steps = [("a red cat", at - 1), ("a blue dog", n - at + 1)], transition + 1
    scheduled = list(pipe.stream(schedule, SamplingOptions(num_frames=33 * n, interpolation_steps=steps, **FAST)))
    assert len(steered) == len(scheduled) == n
    for a, b in zip(steered, scheduled):  # the schedule changes the prompt, so a steering that did nothing fails here
        assert torch.equal(a.frames, b.frames), a.index
    records = [c.prompt for c in steered]
    assert [r["prompt"] for r in records] == ["a red cat"] * at + ["a blue dog"] * (n - at)
    first = 1.0 if transition == 0 else 1 / transition
    assert records[at]["weight"] == first and records[at]["change"]["chunk"] == at


@pytest.mark.slow
def test_the_last_update_before_a_boundary_wins(pipe):
    opts = SamplingOptions(num_frames=66, **FAST)
    chunks, steering = _steered(pipe, opts, {1: [("a green tree", 0, "e1"), ("a blue dog", 0, "e2")]})
    once, _ = _steered(pipe, opts, {1: [("a blue dog", 0, "e2")]})
    assert torch.equal(chunks[1].frames, once[1].frames)
    assert chunks[1].prompt["change"]["event_id"] == "e2" and [c.event_id for c in steering.superseded] == ["e1"]


@pytest.mark.slow
def test_a_new_prompt_is_encoded_when_it_arrives(pipe, monkeypatch):
    steering = Steering()
    stream = pipe.stream("a red cat", SamplingOptions(num_frames=66, **FAST), steering=steering)
    encoded = []
    encode = pipe.text_encoder.encode
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda prompts, n: encoded.append(prompts) or encode(prompts, n))
    steering.set("a blue dog", 1)
    assert encoded == [["a blue dog"]]  # in set(), before any chunk boundary
    assert [c.prompt["prompt"] for c in stream] == ["a blue dog", "a blue dog"]
    assert encoded == [["a blue dog"]]  # not again at the boundary


@pytest.mark.slow
def test_a_steered_run_resumes_identically_even_mid_transition(pipe, tmp_path):
    opts = SamplingOptions(num_frames=33 * 3, **FAST)
    full, _ = _steered(pipe, opts, {1: [("a blue dog", 3)], 2: [("a green tree", 2)]})
    # chunk 2 starts a change from chunk 1's blended text (a third of the way to the dog), not from a prompt
    assert [(c.prompt["prompt"], c.prompt["weight"]) for c in full] == [
        ("a red cat", 1.0), ("a blue dog", 1 / 3), ("a green tree", 0.5)]
    path = tmp_path / "run.state"
    full[1].state.save(path)  # in the middle of the first transition
    steering = Steering()
    steering.set("a green tree", 2)
    resumed = list(pipe.stream("a red cat", opts, resume=path, steering=steering))
    assert [c.index for c in resumed] == [2]
    assert torch.equal(full[2].frames, resumed[0].frames) and full[2].prompt == resumed[0].prompt


@pytest.mark.parametrize("args, message", [(("", 1), "prompt"), (("a dog", -1), "transition_chunks"),
                                           (("a dog", 1.5), "transition_chunks")])
def test_bad_changes_are_refused_naming_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        Steering().set(*args)


@pytest.mark.slow
def test_steering_with_offload_encodes_at_the_boundary_and_makes_the_same_frames(pipe, tmp_path):
    """With offload the text encoder must not visit the device while the transformer runs there: a change is encoded
    by the stream at the next boundary instead of when it arrives, with the same frames."""
    folder = build_tiny_model(tmp_path / "distilled", variant="distilled", seed=0)
    offloaded = HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu", offload="model")
    opts = SamplingOptions(num_frames=66, **FAST)
    resident, _ = _steered(pipe, opts, {1: [("a blue dog", 0)]})
    encoded_in = []
    real = offloaded.text_encoder.encode
    offloaded.text_encoder.encode = lambda *a, **k: encoded_in.append(threading.current_thread().name) or real(*a, **k)
    steering = Steering()
    chunks = []
    for chunk in offloaded.stream("a red cat", opts, steering=steering):
        chunks.append(chunk)
        if chunk.index == 0:
            setter = threading.Thread(target=steering.set, args=("a blue dog", 0), name="caller")
            setter.start()
            setter.join()
    assert "caller" not in encoded_in and len(encoded_in) == 2  # the run's prompts, then the change, in the stream
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(chunks, resident)) and len(chunks) == 2
