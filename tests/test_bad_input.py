"""Bad input that used to get through: each is now refused early, with an error naming the argument and what was
expected, or handled without losing or corrupting anything. In-process (the `helios` command through cli.main);
tests/test_cli_faults.py has the faults that need a real process (SIGTERM, a full disk under the real command).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest
import torch
from helpers import make_inputs, make_ours, tiny_config

from helios import HeliosConfig, HeliosPipeline, HeliosTransformer3DModel, SamplingOptions, make_plan
from helios.pipeline.folder import read_variant
from helios.pipeline.generate import default_dtype
from helios.pipeline.media import load_image, load_video, read_video
from helios.sampling.options import MAX_FRAMES
from helios.pipeline.video_io import VideoSettings, VideoWriter, read_fragments

FAST = ["--height", 64, "--width", 128, "--pyramid-steps", 1, 1, 1, "--no-amplify-first-chunk", "--seed", 7,
        "--num-frames", 33, "--quiet"]
WEIGHTS = ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


@pytest.fixture(scope="module")
def tiny(tiny_folder) -> Path:
    return tiny_folder  # the session's distilled tiny model: copied before any change (copy_model)


@pytest.fixture(scope="module")
def pipe(tiny) -> HeliosPipeline:
    return HeliosPipeline.from_pretrained(tiny, device="cpu")


def helios(capsys, *args) -> tuple[int, str]:
    """(exit code, stderr) of the `helios` command, run in this process."""
    from helios.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    return code, capsys.readouterr().err


def generate(capsys, model, *args, prompt=("--prompt", "a fox")) -> tuple[int, str]:
    return helios(capsys, "generate", "--model", model, *prompt, *FAST, *args)


def copy_model(tiny: Path, tmp_path: Path, truncate=(), config: dict | None = None) -> Path:
    """A copy of the tiny model with the weight files `truncate` cut short and `config` merged into the transformer's."""
    folder = Path(shutil.copytree(tiny, tmp_path / "model"))
    for name in truncate:
        path = folder / name
        path.write_bytes(path.read_bytes()[:-1000])
    if config:
        path = folder / "transformer" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


# -- silently wrong ------------------------------------------------------------------------------------------------


def test_a_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    PIL.Image.fromarray(values).save(tmp_path / "deep.png")
    with PIL.Image.open(tmp_path / "deep.png") as img:
        assert img.mode == "I;16"  # a real 16-bit PNG
        from_object = np.asarray(load_image(img))
    rgb = np.asarray(load_image(tmp_path / "deep.png"))
    expected = np.rint(values / 65535 * 255)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    assert all(np.array_equal(rgb[..., c], expected) for c in range(3)) and np.array_equal(from_object, rgb)
    assert (rgb == 255).mean() < 0.01  # convert("RGB") made 99.7 % of these pixels white


def test_a_16_bit_rgb_png_keeps_its_colours(tmp_path):
    rgb48 = np.zeros((32, 48, 3), np.uint16)
    rgb48[..., 0], rgb48[..., 1], rgb48[..., 2] = 30000, 1000, np.linspace(0, 65535, 48).astype(np.uint16)
    codec = av.CodecContext.create("png", "w")  # Pillow cannot write 48-bit RGB; FFmpeg's PNG encoder can
    codec.width, codec.height, codec.pix_fmt = 48, 32, "rgb48be"
    frame = av.VideoFrame.from_ndarray(rgb48, format="rgb48le").reformat(format="rgb48be")
    (tmp_path / "deep.png").write_bytes(b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None)))
    rgb = np.asarray(load_image(tmp_path / "deep.png")).astype(float)
    assert np.abs(rgb - rgb48 / 257).max() <= 1  # 8 bits of each 16-bit sample


def test_an_existing_output_is_kept_and_the_run_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("fox.mp4").write_bytes(b"an earlier video")
    code, err = generate(capsys, "helios-tiny", "--output", "fox.mp4")
    assert code == 2 and "--output fox.mp4 exists; give --overwrite to replace it" in err
    assert Path("fox.mp4").read_bytes() == b"an earlier video"

    Path("fox.mp4").unlink()
    Path("fox.partial.mp4").write_bytes(b"an interrupted run's video")  # a new run would have truncated it
    code, err = generate(capsys, "helios-tiny", "--output", "fox.mp4")
    assert code == 2 and "fox.partial.mp4 exists, the video of an interrupted run; continue it with --resume" in err
    assert Path("fox.partial.mp4").read_bytes() == b"an interrupted run's video"


def test_overwrite_keeps_the_old_output_until_the_new_video_is_complete(tmp_path, capsys, monkeypatch):
    from helios.cli.progress import Progress

    monkeypatch.chdir(tmp_path)
    Path("fox.mp4").write_bytes(b"an earlier video")
    seen = []
    original = Progress.chunk
    monkeypatch.setattr(Progress, "chunk", lambda self, *a: seen.append(Path("fox.mp4").read_bytes()) or original(self, *a))
    code, err = generate(capsys, "helios-tiny", "--output", "fox.mp4", "--overwrite")
    assert code == 0, err
    assert seen == [b"an earlier video"]  # after the chunk was written, the old video was still there
    assert read_video("fox.mp4")[0].shape == (33, 64, 128, 3) and not Path("fox.partial.mp4").exists()


def test_zero_text_tokens_is_an_error_naming_the_argument():
    config = tiny_config()
    inputs = make_inputs(config, "helios")
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :0]
    with pytest.raises(ValueError, match=r"encoder_hidden_states has 0 tokens \(shape \(1, 0, 32\)\)"):
        make_ours(config)(**inputs)


def _with_sizes(current_hw, memory_hw: dict) -> dict:
    """The 'helios' layout's inputs with the current latents and each memory term resized (zeros)."""
    inputs = make_inputs(tiny_config(), "helios")
    inputs["hidden_states"] = torch.zeros(*inputs["hidden_states"].shape[:3], *current_hw)
    for name, hw in memory_hw.items():
        key = f"latents_history_{name}"
        inputs[key] = torch.zeros(*inputs[key].shape[:3], *hw)
    return inputs


def test_the_memory_has_the_full_resolution_size_the_current_latents_have_or_2_s_times_it():
    """The rule (spec §3.4): every memory term has the full-resolution size; the current latents have it too, or are
    2^s times smaller at a pyramid sampler's stage s steps from full resolution (stage 0 of 3: s = 2)."""
    model = make_ours(tiny_config())
    all_terms = lambda hw: {"short": hw, "mid": hw, "long": hw}  # noqa: E731
    for current, memory in [((8, 16), (8, 16)), ((4, 8), (8, 16)), ((2, 4), (8, 16)), ((6, 10), (12, 20))]:
        out = model(**_with_sizes(current, all_terms(memory))).sample
        assert out.shape[-2:] == current
    refused = {
        "another size than the others": ({"long": (12, 20)}, r"latents_history_long is \(12, 20\) \(H, W\), "
                                         r"latents_history_short is \(8, 16\)"),
        "another size than the current": (all_terms((12, 20)), r"latents_history_short is 12x20 \(H x W\), "
                                          r"hidden_states is 8x16: the memory must have the full-resolution size"),
        "smaller than the current": (all_terms((4, 8)), "latents_history_short is 4x8"),
        "3 times the current": (all_terms((24, 48)), "latents_history_short is 24x48"),
        "scaled on one axis": (all_terms((16, 16)), "latents_history_short is 16x16"),
        "scaled unevenly": (all_terms((16, 64)), "latents_history_short is 16x64"),
    }
    for case, (memory, message) in refused.items():
        with pytest.raises(ValueError, match=message):
            model(**_with_sizes((8, 16), memory))
            pytest.fail(case)


@pytest.mark.parametrize("key, value, expected", [
    ("num_attention_heads", 0, "a positive integer"), ("attention_head_dim", -16, "a positive integer"),
    ("num_layers", 0, "a positive integer"), ("ffn_dim", 64.0, "a positive integer"),
    ("text_dim", "32", "a positive integer"), ("in_channels", True, "a positive integer"),
    ("freq_dim", None, "a positive integer"), ("out_channels", -1, "an integer >= 0"),
    ("added_kv_proj_dim", 0, "a positive integer"), ("eps", math.nan, "a positive number"),
    ("rope_theta", 0, "a positive number"), ("patch_size", (1, 0, 2), "3 positive ints (t, h, w)"),
    ("rope_dim", "466", "3 positive ints (t, h, w)"), ("cross_attn_norm", "yes", "true or false"),
])
def test_zero_negative_or_mistyped_sizes_are_value_errors_naming_the_key(key, value, expected):
    with pytest.raises(ValueError, match="^" + re.escape(f"{key} must be {expected}, got {value!r}") + "$"):
        HeliosTransformer3DModel(**tiny_config(**{key: value}))
    with pytest.raises(ValueError, match=rf"^{key} must be"):
        HeliosConfig(**{key: value})


def test_a_config_file_with_a_mistyped_value_names_the_file_and_the_key(tiny, tmp_path):
    folder = copy_model(tiny, tmp_path, config={"num_layers": "many"})
    path = folder / "transformer" / "config.json"
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: num_layers must be a positive integer, got 'many'")):
        HeliosTransformer3DModel.from_pretrained(folder / "transformer")


# -- messages that say what is wrong -----------------------------------------------------------------------------


def test_seeds_are_the_integers_torch_generator_takes(capsys):
    for good in (0, 2**64 - 1, -(2**63)):
        assert SamplingOptions(seed=good).seed == good
        torch.Generator().manual_seed(good)  # the range is torch's own
    for bad in (2**64, 2**70, -(2**63) - 1, "abc", 1.5, True):
        with pytest.raises(ValueError, match=r"^seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
            SamplingOptions(seed=bad)
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(2**64)
    code, err = generate(capsys, "helios-tiny", "--seed", 2**70)
    assert code == 2 and f"argument --seed: must be an integer in [-2**63, 2**64), got '{2**70}'" in err


def test_guidance_must_be_a_finite_number_not_below_zero(capsys):
    for bad in (math.nan, math.inf, -math.inf, -1.0, "5"):
        with pytest.raises(ValueError, match="^guidance_scale must be a finite number >= 0"):
            SamplingOptions(guidance_scale=bad)
    assert SamplingOptions(guidance_scale=0).guidance_scale == 0
    for bad in ("nan", "inf", "-2"):
        code, err = generate(capsys, "helios-tiny", "--guidance", bad)
        assert code == 2 and f"argument --guidance: must be a finite number >= 0 (1 = no guidance), got '{bad}'" in err


def test_options_given_as_a_dict_are_refused_with_the_fix(pipe):
    with pytest.raises(ValueError, match=r"^opts must be a SamplingOptions, got a dict: pass SamplingOptions\(\*\*\{'height': 64\}\)"):
        pipe.generate("a fox", {"height": 64})


def test_a_truncated_weights_file_is_named_before_anything_loads(tiny, tmp_path, capsys):
    folder = copy_model(tiny, tmp_path, truncate=[WEIGHTS[1]])
    message = f"{folder / WEIGHTS[1]}: truncated"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        HeliosPipeline.from_pretrained(folder, device="cpu")
    code, err = generate(capsys, folder, "--output", tmp_path / "fox.mp4")
    assert code == 2 and f"helios: error: {message}" in err


def test_an_image_too_large_to_read_names_the_argument(tmp_path, capsys):
    PIL.Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")  # 400 megapixels, 50 KB
    with pytest.raises(ValueError, match="^" + re.escape(f"image {tmp_path / 'huge.png'} is too large to read")):
        load_image(tmp_path / "huge.png")
    code, err = generate(capsys, "helios-tiny", "--image", tmp_path / "huge.png", "--output", tmp_path / "fox.mp4")
    assert code == 2 and f"helios: error: --image {tmp_path / 'huge.png'} is too large to read (Image size" in err


def test_a_folder_is_not_a_file(tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a video file"):
        load_video(tmp_path / "clips")
    with pytest.raises(IsADirectoryError, match="is a folder, not an image file"):
        load_image(tmp_path / "clips")
    for flag in ("--video", "--image", "--prompt-schedule", "--resume"):
        prompt = () if flag == "--prompt-schedule" else ("--prompt", "a fox")
        code, err = generate(capsys, "helios-tiny", flag, tmp_path / "clips", "--output", tmp_path / "fox.mp4",
                             prompt=prompt)
        assert code == 2 and f"helios: error: {flag} {tmp_path / 'clips'} is a folder, not a file" in err


def test_an_unsupported_device_is_named_as_such(tiny, capsys, tmp_path):
    with pytest.raises(ValueError, match="^device meta: not supported; helios runs on cpu or cuda"):
        HeliosPipeline.from_pretrained(tiny, device="meta")
    code, err = generate(capsys, "helios-tiny", "--device", "meta", "--output", tmp_path / "fox.mp4")
    assert code == 2 and "helios: error: --device meta: not supported; helios runs on cpu or cuda" in err


@pytest.mark.parametrize("device", ["bogus", "cuda:x"])
def test_a_device_torch_does_not_know_is_refused_in_our_words(capsys, tmp_path, device):
    with pytest.raises(ValueError, match=f"^device {device}: not a device; helios runs on cpu or cuda$"):
        HeliosPipeline.from_pretrained("helios-tiny", device=device)
    code, err = generate(capsys, "helios-tiny", "--device", device, "--output", tmp_path / "fox.mp4")
    assert code == 2 and err.strip() == f"helios: error: --device {device}: not a device; helios runs on cpu or cuda"


@pytest.mark.parametrize("path", ["missing.safetensors", "loras/missing.safetensors", "./loras/style",
                                  "~/loras/missing.safetensors"])
def test_a_missing_lora_file_fails_at_once_without_asking_the_hub(capsys, tmp_path, monkeypatch, path):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    code, err = generate(capsys, "helios-tiny", "--lora", path, "--output", tmp_path / "fox.mp4")
    assert code == 2 and f"--lora {path}: no such file or folder" in err and "hub" not in err.lower()
    from helios.scale.lora_format import locate

    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        locate(path)


def test_only_an_owner_slash_name_goes_to_the_hub():
    from helios.model.hub import is_repo_id

    assert is_repo_id("BestWishYsh/Helios-Distilled") and is_repo_id("me/my-lora.v2")
    assert not any(map(is_repo_id, ["loras/style.safetensors", "./a/b", "~/a", "/a/b", "a/b/c", "model.safetensors"]))


def test_state_and_resume_together_are_refused_up_front(tmp_path, capsys):
    code, err = generate(capsys, "helios-tiny", "--state", tmp_path / "a.state", "--resume", tmp_path / "b.state",
                         "--output", tmp_path / "fox.mp4")
    assert code == 2 and "--state" in err and "--resume" in err and "together" in err
    assert list(tmp_path.iterdir()) == []


# -- late checks and unbounded lengths -----------------------------------------------------------------------------


def test_checks_that_need_the_model_come_before_its_weights_are_read(tiny, tmp_path, capsys):
    """A model folder whose every weight file is corrupt: each mistake is still reported as itself."""
    folder = copy_model(tiny, tmp_path, truncate=WEIGHTS)
    output = ["--output", tmp_path / "fox.mp4"]
    code, err = generate(capsys, folder, *output)
    assert code == 2 and "safetensors: truncated" in err  # the control: a run gets as far as the weights
    cases = {
        ("--height", 100): "height must be a positive multiple of 64 for the distilled model, got 100",
        ("--pyramid-steps", 1, 1): "pyramid_num_inference_steps_list must hold 3 positive step counts",
        ("--device", "meta"): "--device meta: not supported",
        ("--seed", 2**64): "argument --seed: must be an integer",
        ("--num-frames", 10**14): "argument --num-frames: must be at most 2073600",
    }
    for flags, message in cases.items():
        code, err = generate(capsys, folder, *output, *flags)
        assert code == 2 and message in err and "truncated" not in err, (flags, err)
    (tmp_path / "fox.mp4").write_bytes(b"")
    code, err = generate(capsys, folder, *output)
    assert code == 2 and "exists; give --overwrite" in err
    folder = copy_model(tiny, tmp_path / "config", truncate=WEIGHTS, config={"num_layers": "many"})
    code, err = generate(capsys, folder, "--output", tmp_path / "config" / "fox.mp4")
    assert code == 2 and "config.json: num_layers must be a positive integer, got 'many'" in err


def test_the_length_is_bounded_by_a_day_of_video(tiny, capsys):
    variant = read_variant(tiny)
    assert MAX_FRAMES == 24 * 60 * 60 * 24
    assert make_plan("a fox", SamplingOptions(num_frames=MAX_FRAMES), variant).num_chunks == 62837
    with pytest.raises(ValueError, match=f"^num_frames must be at most {MAX_FRAMES} \\(a day of video at 24 fps\\)"):
        make_plan("a fox", SamplingOptions(num_frames=99999999999999), variant)
    with pytest.raises(ValueError, match="^the prompt schedule asks for 1000000001 chunks of 33 frames, more than a day"):
        make_plan([("a fox", 1), ("a cat", 10**9)], SamplingOptions(), variant)
    code, err = generate(capsys, "helios-tiny", "--num-frames", 99999999999999)
    assert code == 2 and "argument --num-frames: must be at most 2073600 (a day of video at 24 fps), got '99999999999999'" in err


def test_the_default_dtype_is_float32_on_a_cpu_and_bfloat16_on_cuda(pipe):
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16  # a rule, checked here without a GPU
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32  # loaded with None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_default_dtype_on_cuda_is_bfloat16(tiny):
    cuda = HeliosPipeline.from_pretrained(tiny)
    assert cuda.device.type == "cuda" and cuda.transformer.dtype == cuda.text_encoder.dtype == torch.bfloat16


# -- a full disk --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(tmp_path: Path, how: str, size: int):
    """A folder where writing fails after about `size` bytes: a tmpfs of that size (real ENOSPC; needs root), or a
    file size limit on this process (real EFBIG from the kernel; anyone may lower their own limit)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if how == "tmpfs":
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root; the file-size-limit case covers the same code")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        try:
            yield folder, errno.ENOSPC
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield folder, errno.EFBIG
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("how", ["tmpfs", "file size limit"])
def test_a_full_disk_cuts_the_torn_fragment_off(tmp_path, how):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (5 * 33, 64, 96, 3), dtype=np.uint8)  # noise: 308 KB per chunk at crf 0
    settings = VideoSettings(96, 64, Fraction(24), crf=0)
    with small_disk(tmp_path, how, 800_000) as (folder, code):  # room for 2 chunks and a part of the third
        writer = VideoWriter.create(folder / "v.mp4", settings)
        with pytest.raises(OSError) as failure:
            for k in range(5):
                writer.write(video[33 * k : 33 * (k + 1)])
        size = writer.partial.stat().st_size
        writer.close()
        header, fragments = read_fragments(writer.partial)
        assert writer.chunks == len(fragments) == 2  # the third did not fit
        assert size == fragments[-1][0] + fragments[-1][1]  # the file ends with the last whole fragment
        frames, _ = read_video(writer.partial)
        assert frames.shape == (66, 64, 96, 3)
        with av.open(str(writer.partial)) as container:  # every packet decodes: no torn tail
            assert sum(len(p.decode()) for p in container.demux(video=0)) == 66
        assert failure.value.errno == code and failure.value.filename == str(writer.partial)  # for the message
