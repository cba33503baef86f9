"""The generation plan: lengths, defaults, prompt blends and schedules, worked out in one place."""

import pytest

import helios.sampling.plan
from helios.sampling.options import SamplingOptions, Variant
from helios.sampling.plan import make_plan
from helios.sampling.prompts import blend_for_chunk
from helios.sampling.schedule import SchedulerConfig

DISTILLED = Variant("distilled", SchedulerConfig(scheduler_type="dmd", time_shift_type="linear",
                                                 use_dynamic_shifting=True), is_distilled=True)
BASE = Variant("base", SchedulerConfig(stages=1, stage_range=(0, 1), use_dynamic_shifting=True))


def test_lengths_round_up_to_whole_chunks_and_trim_to_4n_plus_1():
    plan = make_plan("a fox", SamplingOptions(), DISTILLED)  # the distilled default: 240 frames
    assert (plan.num_chunks, plan.num_frames) == (8, 261)
    assert [plan.frames_in_chunk(k) for k in range(8)] == [33] * 7 + [30]
    assert plan.frames_before(3) == 99 and plan.frames_before(8) == 261
    one = make_plan("a fox", SamplingOptions(num_frames=1), DISTILLED)
    assert (one.num_chunks, one.num_frames) == (1, 33)


def test_seconds_at_a_frame_rate_give_the_length():
    plan = make_plan("a fox", SamplingOptions(), DISTILLED, seconds=4, fps=24)  # 96 frames
    assert (plan.opts.num_frames, plan.num_chunks, plan.num_frames) == (96, 3, 97)
    with pytest.raises(ValueError, match="num_frames or as seconds, not both"):
        make_plan("a fox", SamplingOptions(num_frames=33), DISTILLED, seconds=2)
    for bad in (0, -1, float("nan"), "4"):
        with pytest.raises(ValueError, match="seconds must be a positive number"):
            make_plan("a fox", SamplingOptions(), DISTILLED, seconds=bad)


def test_a_schedule_sets_the_length_unless_one_is_given():
    schedule = [("a fox sleeps", 2), ("the fox wakes up", 3)]
    assert make_plan(schedule, SamplingOptions(), DISTILLED).num_chunks == 5
    assert make_plan(schedule, SamplingOptions(num_frames=33 * 7), DISTILLED).num_chunks == 7  # the last prompt goes on
    assert make_plan(schedule, SamplingOptions(num_frames=33), DISTILLED).num_chunks == 5  # never cut short


def test_defaults_fill_what_is_unset():
    plan = make_plan("a fox", SamplingOptions(width=320), DISTILLED, {"height": 192, "width": 640, "num_frames": 66,
                                                                      "pyramid_num_inference_steps_list": (1, 1, 1)})
    assert (plan.opts.height, plan.opts.width, plan.num_chunks) == (192, 320, 2)
    assert plan.opts.pyramid_num_inference_steps_list == (1, 1, 1)
    variant_defaults = make_plan("a fox", SamplingOptions(), BASE).opts
    assert (variant_defaults.height, variant_defaults.width, variant_defaults.num_inference_steps) == (384, 640, 50)


def test_options_are_checked_when_the_plan_is_made():
    with pytest.raises(ValueError, match="height must be a positive multiple of 64"):
        make_plan("a fox", SamplingOptions(height=100), DISTILLED)
    with pytest.raises(ValueError, match="opts must be a SamplingOptions"):
        make_plan("a fox", {"height": 64}, DISTILLED)
    with pytest.raises(ValueError, match="prompt must be a string"):
        make_plan(42, SamplingOptions(), DISTILLED)


def test_blends_follow_the_schedule():
    schedule = [("a", 2), ("b", 4)]
    plan = make_plan(schedule, SamplingOptions(interpolation_steps=3), DISTILLED)
    assert [plan.blend(k) for k in range(plan.num_chunks)] == [blend_for_chunk(schedule, k, 3) for k in range(6)]
    assert plan.blend(2) == (0, 1, 0.0) and plan.blend(3) == (0, 1, 0.5) and plan.blend(4) == (1, 1, 1.0)
    assert plan.prompts == ["a", "b"]


def test_the_first_distilled_chunk_is_amplified():
    plan = make_plan("a fox", SamplingOptions(height=64, width=64), DISTILLED)
    first, later = plan.stage_schedules(0), plan.stage_schedules(1)
    assert [len(s) for s in first] == [4, 4, 4] and [len(s) for s in later] == [2, 2, 2]
    base = make_plan("a fox", SamplingOptions(height=64, width=64, num_inference_steps=7), BASE)
    assert [len(s) for s in base.stage_schedules(0)] == [7]


def test_stream_parses_the_schedule_once(tiny_folder, monkeypatch):
    import torch

    from helios import HeliosPipeline

    calls = []
    original = helios.sampling.plan.as_schedule
    monkeypatch.setattr(helios.sampling.plan, "as_schedule", lambda prompt: calls.append(1) or original(prompt))
    pipe = HeliosPipeline.from_pretrained(tiny_folder, torch_dtype=torch.float32)
    opts = SamplingOptions(height=64, width=64, pyramid_num_inference_steps_list=(1, 1, 1), seed=0)
    chunks = list(pipe.stream([("a fox", 1), ("a dog", 1)], opts))
    assert len(chunks) == 2 and calls == [1]
    assert pipe.plan("a fox", opts).opts == make_plan("a fox", opts, pipe.variant, pipe.defaults).opts
