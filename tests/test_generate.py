"""The generation API's behaviour: streaming, cancellation, prompt schedules, resuming, and input checks."""

import gc
import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from helios import HeliosPipeline, SamplingOptions
from helios.sampling.denoise import Cancelled
from helios.sampling.prompts import as_schedule, blend_for_chunk
from helios.pipeline.state import GenerationState
from helios.pipeline.tiny import build_tiny_model

H, W = 64, 128
FAST = dict(height=H, width=W, pyramid_num_inference_steps_list=(1, 1, 1), is_amplify_first_chunk=False, seed=7)


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


@pytest.fixture(scope="module")
def pipe(folder):
    return HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


def test_variant_defaults_come_from_the_folder(pipe):
    opts = SamplingOptions(height=H, width=W).resolve(pipe.variant)
    assert pipe.variant.name == "distilled"
    assert opts.pyramid_num_inference_steps_list == (2, 2, 2) and opts.guidance_scale == 1.0
    assert opts.is_amplify_first_chunk and opts.num_frames == 240


def test_stream_yields_each_chunk_before_computing_the_next(pipe):
    steps = []
    opts = SamplingOptions(num_frames=99, **FAST)
    stream = pipe.stream("a fox", opts, on_step=lambda info: info.phase == "denoise" and steps.append(info.chunk))
    first = next(stream)
    assert first.index == 0 and first.num_chunks == 3 and steps == [0, 0, 0]
    assert first.frames.shape == (33, H, W, 3) and first.frames.dtype == torch.float32
    assert 0 <= first.frames.min() and first.frames.max() <= 1
    assert first.latents.shape == (1, 16, 9, H // 8, W // 8)
    rest = list(stream)
    assert [c.index for c in rest] == [1, 2] and steps == [0] * 3 + [1] * 3 + [2] * 3
    assert sum(c.frames.shape[0] for c in [first, *rest]) == 97  # 99 frames -> 3 chunks -> trimmed to 4n + 1


def test_generate_concatenates_the_stream(pipe):
    opts = SamplingOptions(num_frames=66, **FAST)
    video = pipe.generate("a fox", opts)
    chunks = list(pipe.stream("a fox", opts))
    assert torch.equal(video.frames, torch.cat([c.frames for c in chunks]))
    assert torch.equal(video.latents, torch.cat([c.latents for c in chunks], dim=2)) and video.seed == 7


def _live_tensor_bytes():
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on every live object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return sum(o.untyped_storage().nbytes() for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.slow
def test_cancel_between_chunks_and_between_steps_frees_memory(pipe):
    opts = SamplingOptions(num_frames=99, **FAST)
    list(pipe.stream("warm up", SamplingOptions(num_frames=33, **FAST)))
    before = _live_tensor_bytes()
    for _ in range(3):
        for chunk in pipe.stream("a fox", opts):
            break  # stop between chunks
        del chunk
    assert list(pipe.stream("a fox", opts, on_step=lambda info: info.step == 2)) == []  # stop between steps
    with pytest.raises(Cancelled):
        pipe.generate("a fox", opts, on_step=lambda info: True)
    assert _live_tensor_bytes() <= before * 1.01 + 4096


def test_prompt_schedule_blends_then_holds_the_last_prompt():
    schedule = as_schedule([("a", 2), ("b", 4)])
    got = [blend_for_chunk(schedule, k, steps=3) for k in range(8)]
    assert got[:2] == [(0, 0, 1.0)] * 2
    assert got[2:5] == [(0, 1, 0.0), (0, 1, 0.5), (1, 1, 1.0)]
    assert got[5:] == [(1, 1, 1.0)] * 3  # past the end: the last prompt, not the first (the official quirk)


def test_prompt_schedule_feeds_blended_text_to_the_model(pipe, monkeypatch):
    seen = []
    forward = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append(args[2].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    opts = SamplingOptions(num_frames=33, interpolation_steps=3, **FAST)
    chunks = list(pipe.stream([("a cat", 1), ("a dog", 3)], opts))
    assert len(chunks) == 4  # the schedule asks for more chunks than num_frames
    per_chunk = seen[::3]  # three steps (stages) per chunk; guidance 1 means one forward per step
    cat, dog = pipe._encode_texts(["a cat", "a dog"], opts.resolve(pipe.variant))
    assert torch.equal(per_chunk[0][0], cat) and torch.equal(per_chunk[1][0], cat)
    torch.testing.assert_close(per_chunk[2][0], torch.lerp(cat, dog, 0.5))
    assert torch.equal(per_chunk[3][0], dog)


@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["t2v", "i2v"])
def test_resume_after_a_chunk_gives_the_uninterrupted_frames(pipe, tmp_path, conditioning):
    opts = SamplingOptions(num_frames=99, **FAST)
    extra = {"image": PIL.Image.new("RGB", (W, H), (200, 30, 30))} if conditioning == "i2v" else {}
    prompt = [("a cat", 1), ("a dog", 2)]
    full = list(pipe.stream(prompt, opts, **extra))
    path = tmp_path / "run.state"
    for chunk in pipe.stream(prompt, opts, **extra):
        chunk.state.save(path)
        if chunk.index == 0:
            break
    fresh = HeliosPipeline.from_pretrained(pipe.folder, torch_dtype=torch.float32, device="cpu")
    resumed = list(fresh.stream(prompt, SamplingOptions(**{**FAST, "seed": None}, num_frames=99), resume=path))
    assert [c.index for c in resumed] == [1, 2]
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)


def test_resuming_from_a_state_object_leaves_it_intact(pipe):
    opts = SamplingOptions(num_frames=99, **FAST)
    state = next(pipe.stream("a fox", opts)).state
    latents = state.history.latents.clone()
    first = [c.frames for c in pipe.stream("a fox", opts, resume=state)]
    second = [c.frames for c in pipe.stream("a fox", opts, resume=state)]  # the run must not have advanced `state`
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(state.history.latents, latents)


def test_generate_from_the_state_of_a_finished_run_says_so(pipe):
    opts = SamplingOptions(num_frames=33, **FAST)
    state = next(pipe.stream("a fox", opts)).state  # the only chunk: the run is finished
    assert list(pipe.stream("a fox", opts, resume=state)) == []  # streaming has nothing left to yield
    with pytest.raises(ValueError, match="finished run"):
        pipe.generate("a fox", opts, resume=state)


def test_resume_with_other_settings_is_refused(pipe, tmp_path):
    chunk = next(pipe.stream("a fox", SamplingOptions(num_frames=66, **FAST)))
    chunk.state.save(tmp_path / "s")
    with pytest.raises(ValueError, match="other settings"):
        next(pipe.stream("another prompt", SamplingOptions(num_frames=66, **FAST), resume=tmp_path / "s"))
    assert GenerationState.load(tmp_path / "s").next_chunk == 1


def test_keep_first_frame_false_runs(pipe):
    # The reference sizes its buffer for 16 + 2 + 1 frames but splits 16 + 2 + 2 and fails; we size it to the split.
    video = pipe.generate("a fox", SamplingOptions(num_frames=66, keep_first_frame=False, **FAST))
    assert video.latents.shape[2] == 18


BAD = [
    (dict(num_frames=0), "num_frames"),
    (dict(num_frames=-5), "num_frames"),
    (dict(height=96), "height must be a positive multiple of 64"),
    (dict(width=100), "width must be a positive multiple of 64"),
    (dict(pyramid_num_inference_steps_list=(1, 1)), "pyramid_num_inference_steps_list"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_options_fail_before_any_work(pipe, change, message, monkeypatch):
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: pytest.fail("model ran"))
    with pytest.raises(ValueError, match=message):
        next(pipe.stream("a fox", SamplingOptions(**{**FAST, "num_frames": 33, **change})))


def test_bad_conditioning_fails_clearly(pipe, tmp_path):
    opts = SamplingOptions(num_frames=33, **FAST)
    image = PIL.Image.new("RGB", (W, H))
    with pytest.raises(ValueError, match="not both"):
        next(pipe.stream("x", opts, image=image, video=[image] * 40))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        next(pipe.stream("x", opts, image=tmp_path / "broken.png"))
    with pytest.raises(ValueError, match="missing.mp4"):
        next(pipe.stream("x", opts, video=tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="video has 20 frames.*at least 33"):
        next(pipe.stream("x", opts, video=[image] * 20))
    with pytest.raises(ValueError, match="positive number of chunks"):
        next(pipe.stream([("a", 2), ("b", 0)], opts))


def test_inputs_are_checked_when_stream_is_called(pipe):
    with pytest.raises(ValueError, match="num_frames"):
        pipe.stream("a fox", SamplingOptions(**{**FAST, "num_frames": 0}))  # no next(): the call itself raises


@pytest.mark.slow
def test_conditioning_from_files_equals_objects(pipe, tmp_path):
    from helpers import write_video

    rng = np.random.default_rng(5)
    clip = rng.integers(0, 256, (40, H, W, 3), dtype=np.uint8)
    write_video(tmp_path / "clip.mkv", clip, codec="ffv1")
    PIL.Image.fromarray(clip[0]).save(tmp_path / "first.png")
    opts = SamplingOptions(num_frames=33, **FAST)
    from_file = pipe.generate("x", opts, video=tmp_path / "clip.mkv")
    from_frames = pipe.generate("x", opts, video=[PIL.Image.fromarray(f) for f in clip])
    assert torch.equal(from_file.latents, from_frames.latents)
    from_png = pipe.generate("x", opts, image=str(tmp_path / "first.png"))
    assert torch.equal(from_png.latents, pipe.generate("x", opts, image=PIL.Image.fromarray(clip[0])).latents)


def test_base_size_rule_is_16(tmp_path):
    base = HeliosPipeline.from_pretrained(build_tiny_model(tmp_path / "base", variant="base"), torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        next(base.stream("x", SamplingOptions(height=72, width=W, num_frames=33, num_inference_steps=1)))


def test_pipeline_loads_by_hub_id_from_the_offline_cache(folder, offline_hub):
    import shutil

    from helpers import fake_hub_snapshot

    shutil.copytree(folder, fake_hub_snapshot(offline_hub, "tiny-org/helios-tiny"), dirs_exist_ok=True)
    by_id = HeliosPipeline.from_pretrained("tiny-org/helios-tiny", torch_dtype=torch.float32, device="cpu")
    assert by_id.variant.name == "distilled"
    opts = SamplingOptions(num_frames=33, **FAST)
    by_path = HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    assert torch.equal(by_id.generate("x", opts).frames, by_path.generate("x", opts).frames)


def test_folder_missing_a_component_names_it(folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        HeliosPipeline.from_pretrained(broken)
    shutil.copytree(folder / "vae", broken / "vae")
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "SomethingElse"}))
    with pytest.raises(ValueError, match="_class_name"):
        HeliosPipeline.from_pretrained(broken)
