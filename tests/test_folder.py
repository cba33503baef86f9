"""Model folders: the published layout, variants, built-in names, and who imports whom."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helios import HeliosPipeline
from helios.pipeline.folder import BUILTIN_MODELS, model_path, open_model, read_folder

SRC = Path(__file__).resolve().parents[1] / "src" / "helios"


@pytest.mark.parametrize("variant, flags", [("base", (False, False)), ("mid", (True, False)),
                                            ("distilled", (False, True))])
def test_the_variant_comes_from_the_folder(tiny_folders, variant, flags):
    model = read_folder(tiny_folders[variant])
    assert model.variant.name == variant
    assert (model.variant.is_cfg_zero_star, model.variant.is_distilled) == flags
    assert model.variant.scheduler.stages == (1 if variant == "base" else 3)
    assert model.patch_size == (1, 2, 2) and model.defaults["height"] == 384 and model.builtin is None


def test_an_incomplete_or_foreign_folder_is_named(tmp_path, tiny_folder):
    broken = shutil.copytree(tiny_folder, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="missing vae"):
        read_folder(broken)
    index = json.loads((broken / "model_index.json").read_text())
    shutil.copytree(tiny_folder / "vae", broken / "vae")
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="_class_name must be one of"):
        read_folder(broken)
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        with open_model("no-such-model"):
            pass


def test_a_builtin_model_lives_for_the_with_and_carries_its_defaults():
    with open_model("helios-tiny-mid") as model:
        assert model.builtin == "helios-tiny-mid" and model.variant.name == "mid"
        assert model.path.is_dir() and model.defaults["height"] == BUILTIN_MODELS["helios-tiny-mid"].defaults["height"]
        assert model.defaults["pyramid_num_inference_steps_list"] == (20, 20, 20)  # the rest is the variant's
        path = model.path
    assert not path.exists()
    with model_path("helios-tiny") as (path, builtin):
        assert builtin == "helios-tiny" and (path / "model_index.json").is_file()


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_models_load_in_python(name):
    pipe = HeliosPipeline.from_pretrained(name)
    assert pipe.transformer.dtype == torch.float32  # the CPU default
    assert pipe.variant.name == BUILTIN_MODELS[name].variant
    plan = pipe.plan("a fox")
    assert (plan.opts.height, plan.opts.width) == (BUILTIN_MODELS[name].defaults["height"],
                                                   BUILTIN_MODELS[name].defaults["width"])
    assert pipe.folder.path.is_dir()  # kept as long as the pipeline lives


def test_naming_a_model_does_not_import_torch():
    code = ("import sys, helios.pipeline.folder as f; f.check_model_name('helios-tiny'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


