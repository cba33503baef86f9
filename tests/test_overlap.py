"""Decoding off the critical path (pipeline/overlap.py), the text encoder's release, and the per-step overhead probe:
the overlapped stream gives the sequential one's chunks bit for bit, cancels and fails cleanly, and leaves no thread."""

import threading

import numpy as np
import pytest
import torch
from torch import nn

from helios import HeliosPipeline, SamplingOptions
from helios.pipeline.overlap import resolve_overlap
from helios.pipeline.steering import Steering
from helios.sampling.denoise import step_overhead
from helios.scale.offload import Resident

OPTS = SamplingOptions(height=64, width=64, num_frames=99, pyramid_num_inference_steps_list=(1, 1, 1), seed=3)


@pytest.fixture(scope="module")
def pipe():
    return HeliosPipeline.from_pretrained("helios-tiny", device="cpu")


def _producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "helios-denoise" and t.is_alive()]


def _same_chunks(a, b) -> None:
    assert [c.index for c in a] == [c.index for c in b] and len(a) == 3
    for x, y in zip(a, b):
        assert torch.equal(x.frames, y.frames) and torch.equal(x.latents, y.latents)
        assert x.prompt == y.prompt and x.num_chunks == y.num_chunks
        assert torch.equal(x.state.history.latents, y.state.history.latents)
        assert (x.state.history.anchor is None) == (y.state.history.anchor is None)
        assert x.state.history.anchor is None or torch.equal(x.state.history.anchor, y.state.history.anchor)
        assert torch.equal(x.state.rng_state, y.state.rng_state)
        assert (x.state.next_chunk, x.state.seed) == (y.state.next_chunk, y.state.seed)
        assert x.state.prompts == y.state.prompts


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_overlapped_chunks_equal_the_sequential_ones(pipe, mode):
    media = {"image": np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)} if mode == "i2v" else {}
    sequential = list(pipe.stream("a fox", OPTS, overlap_decode=False, **media))
    overlapped = list(pipe.stream("a fox", OPTS, overlap_decode=True, **media))
    _same_chunks(sequential, overlapped)
    video = pipe.generate("a fox", OPTS, overlap_decode=True, **media)
    assert torch.equal(video.frames, torch.cat([c.frames for c in sequential]))
    assert torch.equal(video.latents, torch.cat([c.latents for c in sequential], dim=2))
    assert not _producers()


def test_a_resumed_overlapped_stream_continues_the_state(pipe):
    whole = list(pipe.stream("a fox", OPTS, overlap_decode=False))
    rest = list(pipe.stream(None, resume=whole[0].state, overlap_decode=True))
    assert [c.index for c in rest] == [1, 2]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(whole[1:], rest))


def test_cancel_from_on_step_yields_the_denoised_chunks_and_stops_the_thread(pipe):
    def stop_at_chunk_1(info):
        return info.phase == "denoise" and info.chunk == 1

    sequential = list(pipe.stream("a fox", OPTS, on_step=stop_at_chunk_1, overlap_decode=False))
    overlapped = list(pipe.stream("a fox", OPTS, on_step=stop_at_chunk_1, overlap_decode=True))
    assert [c.index for c in overlapped] == [c.index for c in sequential] == [0]
    assert torch.equal(overlapped[0].frames, sequential[0].frames)
    assert not _producers()


def test_closing_the_stream_mid_way_leaves_no_thread(pipe):
    stream = pipe.stream("a fox", OPTS, overlap_decode=True)
    first = next(stream)
    assert first.index == 0 and _producers()  # chunk 1 is denoising meanwhile
    stream.close()
    assert not _producers()
    for chunk in pipe.stream("a fox", OPTS, overlap_decode=True):  # a consumer that breaks out of its loop
        break
    assert not _producers()


def test_an_error_in_the_producer_reaches_the_consumer_after_the_chunks_before_it(pipe, monkeypatch):
    denoise = pipe._denoise

    def failing(run, k, on_step):
        if k == 1:
            raise RuntimeError("boom at chunk 1")
        return denoise(run, k, on_step)

    monkeypatch.setattr(pipe, "_denoise", failing)
    seen = []
    with pytest.raises(RuntimeError, match="boom at chunk 1"):
        for chunk in pipe.stream("a fox", OPTS, overlap_decode=True):
            seen.append(chunk.index)
    assert seen == [0] and not _producers()


def test_an_error_in_the_decode_stops_the_producer(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "_decode", lambda run, done, on_step: (_ for _ in ()).throw(ValueError("no decode")))
    with pytest.raises(ValueError, match="no decode"):
        list(pipe.stream("a fox", OPTS, overlap_decode=True))
    assert not _producers()


def test_on_step_is_never_called_from_both_threads_at_once(pipe):
    inside, overlaps, phases = [0], [], []

    def on_step(info):
        inside[0] += 1
        overlaps.append(inside[0] > 1)
        phases.append((info.phase, info.chunk))
        inside[0] -= 1

    list(pipe.stream("a fox", OPTS, on_step=on_step, overlap_decode=True))
    assert not any(overlaps)
    assert sorted(k for phase, k in phases if phase == "decode") == [0, 1, 2]
    assert [k for phase, k in phases if phase == "denoise"] == [0] * 6 + [1] * 3 + [2] * 3  # amplified chunk 0


def test_steering_lands_at_the_first_chunk_not_yet_started(pipe):
    steering = Steering()
    overlapped = []
    for chunk in pipe.stream("a fox", OPTS, steering=steering, overlap_decode=True):
        overlapped.append(chunk)
        if chunk.index == 0:
            steering.set("a cat", 0)
    start = overlapped[-1].prompt["change"]["chunk"]
    assert start in (1, 2)  # chunk 1 may have started while chunk 0 was decoded and yielded
    steering, sequential = Steering(), []
    for chunk in pipe.stream("a fox", OPTS, steering=steering, overlap_decode=False):
        sequential.append(chunk)
        if chunk.index == start - 1:
            steering.set("a cat", 0)
    _same_chunks(sequential, overlapped)


def test_resolve_overlap():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_overlap(None, cpu, offload=False) is False
    assert resolve_overlap(None, cuda, offload=False) is True
    assert resolve_overlap(None, cuda, offload=True) is False  # offload: off, never an error
    assert resolve_overlap(True, cpu, offload=False) is True and resolve_overlap(False, cuda, offload=False) is False
    with pytest.raises(ValueError, match="overlap_decode=True does not work with offload"):
        resolve_overlap(True, cuda, offload=True)
    with pytest.raises(ValueError, match="overlap_decode must be True, False or None"):
        resolve_overlap("yes", cpu, offload=False)


def test_offload_model_runs_without_overlap_and_refuses_it():
    pipe = HeliosPipeline.from_pretrained("helios-tiny", device="cpu", offload="model")
    with pytest.raises(ValueError, match="overlap_decode=True does not work with offload"):
        pipe.stream("a fox", OPTS, overlap_decode=True)
    assert len(list(pipe.stream("a fox", OPTS))) == 3  # None: off


# -- the text encoder leaves the GPU once the prompts are encoded ------------------------------------------------


class _Spy:
    """A placement that records the pipeline's release calls (on a CPU the real one has nothing to release)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def release(self, name):
        self.calls.append(name)


def test_the_text_encoder_is_released_unless_a_steering_may_encode_again(pipe, monkeypatch):
    spy = _Spy(pipe.placement)
    monkeypatch.setattr(pipe, "placement", spy)
    monkeypatch.setattr("helios.pipeline.generate.Resident", _Spy)  # the steering's bind still sees a resident one
    pipe.stream("a fox", OPTS)
    assert spy.calls == ["text_encoder"]
    spy.calls.clear()
    pipe.stream("a fox", OPTS, steering=Steering())
    assert spy.calls == []


def test_a_released_component_comes_back_on_use_and_leaves_without_a_copy():
    encoder = nn.Linear(4, 4)
    host = encoder.weight.data_ptr()
    # On a CPU "the device" is the CPU too: a return still makes a device copy of its own, which shows the moves.
    placement = Resident(nn.Linear(1, 1), {"text_encoder": encoder}, device="cpu")
    placement.release("text_encoder")  # first release: to the host (here already there)
    assert placement.released == {"text_encoder"}
    with placement.on_device("text_encoder"):
        assert encoder.weight.data_ptr() != host and placement.released == set()
    assert encoder.weight.data_ptr() != host  # it stays on the device until released
    placement.release("text_encoder")
    assert encoder.weight.data_ptr() == host  # back on the same host tensor: no copy
    placement.release("vae")  # not releasable: nothing happens
    placement.drop("text_encoder")
    with placement.on_device("text_encoder"):
        assert encoder.weight.data_ptr() == host


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_text_encoder_leaves_and_overlap_gives_the_same_chunks():
    pipe = HeliosPipeline.from_pretrained("helios-tiny", device="cuda", torch_dtype=torch.float32)
    assert pipe.text_encoder.device.type == "cuda"
    sequential = list(pipe.stream("a fox", OPTS, overlap_decode=False))
    assert pipe.text_encoder.device.type == "cpu"
    _same_chunks(sequential, list(pipe.stream("a fox", OPTS)))  # None: on, on CUDA


def test_step_overhead_times_the_loop_without_the_model(pipe):
    plan = pipe.plan("a fox", OPTS)
    noise = torch.randn(1, 16, 9, *plan.latent_size, generator=torch.Generator().manual_seed(0))
    seconds = step_overhead(noise, plan.stage_schedules(0), pipe.variant, torch.float32)
    assert 0 < seconds < 1
    with pytest.raises(ValueError, match="schedules"):
        step_overhead(noise, [], pipe.variant, torch.float32)
