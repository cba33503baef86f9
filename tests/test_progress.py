"""Progress through every phase of a run: the pipeline reports each one through on_step (generate.StepInfo), and the
command's bar names it and keeps its clock running while a phase takes time (issue 10, point 3)."""

import re
import time

import PIL.Image
import pytest
import torch

from helios import HeliosPipeline, SamplingOptions
from helios.cli.progress import Progress
from helios.pipeline.generate import PHASES, StepInfo
from helios.pipeline.tiny import build_tiny_model

H, W = 64, 128
FAST = dict(height=H, width=W, pyramid_num_inference_steps_list=(1, 1, 1), is_amplify_first_chunk=False, seed=7)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "distilled", variant="distilled", seed=0)
    return HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


def phases(events: list[StepInfo]) -> list[tuple[str, int]]:
    """(phase, chunk) with each chunk's denoising steps merged into one entry."""
    merged = []
    for e in events:
        if not merged or merged[-1] != (e.phase, e.chunk) or e.phase != "denoise":
            merged.append((e.phase, e.chunk))
    return merged


@pytest.mark.parametrize("mode", ["t2v", "i2v", "v2v"])
def test_stream_reports_every_phase_in_order(pipe, mode):
    image = PIL.Image.new("RGB", (W, H), (200, 30, 30))
    conditioning = {"t2v": {}, "i2v": {"image": image}, "v2v": {"video": [image] * 33}}[mode]
    events = []
    stream = pipe.stream("a fox", SamplingOptions(num_frames=66, **FAST), on_step=events.append, **conditioning)
    before = {"t2v": [("text", 0)], "i2v": [("text", 0), ("image", 0)], "v2v": [("text", 0), ("video", 0)]}[mode]
    assert phases(events) == before  # the encodings happen, and are reported, when stream() is called
    assert len(list(stream)) == 2
    assert phases(events) == before + [("denoise", 0), ("decode", 0), ("denoise", 1), ("decode", 1)]
    assert {e.phase for e in events} <= set(PHASES)
    steps = [e for e in events if e.phase == "denoise"]
    assert [e.step for e in steps] == [1, 2, 3] * 2 and {e.steps for e in steps} == {3}  # as before: step of steps
    decodes = [e for e in events if e.phase == "decode"]
    assert [(e.step, e.steps, e.num_chunks) for e in decodes] == [(3, 3, 2)] * 2


def test_a_resumed_stream_reports_from_its_next_chunk(pipe):
    opts = SamplingOptions(num_frames=66, **FAST)
    state = next(pipe.stream("a fox", opts)).state
    events = []
    assert len(list(pipe.stream("a fox", opts, resume=state, on_step=events.append))) == 1
    assert phases(events) == [("text", 1), ("denoise", 1), ("decode", 1)]  # nothing to encode: the memory is saved


def test_the_phase_callback_cancels_at_steps_only(pipe):
    opts = SamplingOptions(num_frames=33, **FAST)
    assert len(list(pipe.stream("a fox", opts, on_step=lambda info: info.phase != "denoise"))) == 1
    assert list(pipe.stream("a fox", opts, on_step=lambda info: info.phase == "denoise")) == []


def bar_frames(err: str) -> list[str]:
    """The bar as drawn, one redraw each (tqdm redraws in place with a carriage return)."""
    return [frame.strip() for frame in re.split(r"[\r\n]", err) if frame.strip()]


def test_the_bar_names_each_phase_and_its_clock_runs_through_a_long_one(capsys):
    progress = Progress("bar", num_chunks=2, total_frames=65, total_steps=4)
    progress.step(StepInfo(0, 2, 0, 0, "text"))
    for step in (1, 2):
        progress.step(StepInfo(0, 2, step, 2))
    progress.step(StepInfo(0, 2, 2, 2, "decode"))
    time.sleep(2.5)  # a long decode: the bar is redrawn, its clock moving, without an event
    progress.phase("writing")
    progress.phase("saving state")
    progress.chunk(0, 33, "out.partial.mp4")
    progress.close()
    frames = bar_frames(capsys.readouterr().err)
    labels = [re.match(r"^(.*?)\s*[ ▏▎▍▌▋▊▉█]*\d+/\d+ steps", frame).group(1) for frame in frames]
    assert [label for i, label in enumerate(labels) if i == 0 or label != labels[i - 1]] == [
        "encoding text", "chunk 1/2 denoising", "chunk 1/2 decoding", "chunk 1/2 writing", "chunk 1/2 saving state"]
    clocks = {re.search(r"\[(\d\d:\d\d)", f).group(1) for f, label in zip(frames, labels) if "decoding" in label}
    assert {"00:00", "00:01", "00:02"} <= clocks, frames
    assert "2/4 steps" in frames[-1] and "frames 33/65" in frames[-1]


@pytest.mark.parametrize("first_chunk", [0, 1])
def test_the_step_total_is_right_from_the_first_frame_of_the_bar(pipe, capsys, first_chunk):
    """An amplified first chunk takes twice the steps: the total counts it once, not once per chunk (was "9/120
    steps" for a video of 66), and a resumed run counts the chunks it has left."""
    opts = SamplingOptions(num_frames=99, **{**FAST, "is_amplify_first_chunk": True})
    plan = pipe.plan("a fox", opts)
    assert [plan.steps_in_chunk(k) for k in range(3)] == [6, 3, 3]
    resume = next(pipe.stream("a fox", opts)).state if first_chunk else None
    progress = Progress("bar", plan.num_chunks, plan.num_frames, first_chunk, plan.frames_before(first_chunk),
                        plan.total_steps(first_chunk))
    events = []
    for chunk in pipe.stream("a fox", opts, resume=resume,
                             on_step=lambda info: (events.append(info), progress.step(info))[1]):
        progress.chunk(chunk.index, chunk.frames.shape[0], "out.partial.mp4")
    progress.close()
    steps = sum(e.phase == "denoise" for e in events)
    assert steps == plan.total_steps(first_chunk) == (12 if first_chunk == 0 else 6)
    totals = {int(m.group(1)) for m in re.finditer(r"\d+/(\d+) steps", capsys.readouterr().err)}
    assert totals == {steps}


def test_json_and_quiet_modes_draw_no_bar(capsys):
    for mode in ("json", "quiet"):
        progress = Progress(mode, num_chunks=1, total_frames=33)
        progress.step(StepInfo(0, 1, 0, 0, "text"))
        progress.step(StepInfo(0, 1, 1, 1))
        progress.phase("writing")
        progress.close()
    assert capsys.readouterr().err == ""
