"""A deterministic tiny Helios model folder ("helios-tiny"): the published repo layout at toy sizes.

Every component is random but seeded, so two builds are byte-identical and a whole chunk runs in about a second on a
laptop CPU. The folder loads both in this package and in the reference diffusers pipelines (the test oracle), which is
why model_index.json and scheduler_config.json name the reference's classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..model.config import HeliosConfig
from ..model.transformer import HeliosTransformer3DModel

VARIANTS = ("base", "mid", "distilled")
DIFFUSERS_VERSION = "0.42.1"

TINY_TEXT_DIM = 32
TINY_TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    rope_dim=(4, 6, 6),  # splits the head dim like the real (44, 42, 42) split of 128
    ffn_dim=64,
    num_layers=2,
    text_dim=TINY_TEXT_DIM,
    freq_dim=32,
)
TINY_UMT5 = dict(
    vocab_size=128,
    d_model=TINY_TEXT_DIM,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    d_ff=64,
    feed_forward_proj="gated-gelu",  # as umt5-xxl
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# Word-level vocabulary: enough common words that test prompts produce different, non-<unk> tokens.
WORDS = """
, . a an the and or of in on at with to from by is are it its this that while through over under into
cat dog man woman child bird fish horse car boat tree flower house city street road river sea ocean beach
mountain forest sky sun moon cloud rain snow water fire light night day morning kitchen table window
red blue green white black yellow golden small big old young bright dark slow fast soft warm cold
walking running flying swimming dancing baking cooking sitting standing looking playing jumping
camera view close shot scene video cake together wooden cozy background people
""".split()
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5: pad 0, eos 1

# The pipeline flags and scheduler per variant (docs/design.md §4.8); keys are the reference classes' __init__
# arguments.
_UNIPC = {
    "num_train_timesteps": 1000, "shift": 1.0, "gamma": 1 / 3, "thresholding": False,
    "prediction_type": "flow_prediction", "solver_order": 2, "predict_x0": True, "solver_type": "bh2",
    "lower_order_final": True, "disable_corrector": [], "solver_p": None, "use_flow_sigmas": True,
    "scheduler_type": "unipc", "use_dynamic_shifting": True, "time_shift_type": "exponential",
}
_PYRAMID = {"stages": 3, "stage_range": [0, 1 / 3, 2 / 3, 1]}
_DMD = {
    "num_train_timesteps": 1000, "shift": 1.0, "gamma": 1 / 3, "prediction_type": "flow_prediction",
    "use_flow_sigmas": True, "use_dynamic_shifting": True, "time_shift_type": "linear",
}
PIPELINES = {
    "base": ("HeliosPipeline", {}, ("HeliosScheduler", {**_UNIPC, "stages": 1, "stage_range": [0, 1]})),
    "mid": (
        "HeliosPyramidPipeline",
        {"is_cfg_zero_star": True, "is_distilled": False},
        ("HeliosScheduler", {**_UNIPC, **_PYRAMID}),
    ),
    "distilled": (
        "HeliosPyramidPipeline",
        {"is_cfg_zero_star": False, "is_distilled": True},
        ("HeliosDMDScheduler", {**_DMD, **_PYRAMID}),
    ),
}


def build_tiny_model(folder: str | Path, variant: str = "distilled", seed: int = 0, **transformer) -> Path:
    """Write a tiny model of `variant` ("base", "mid" or "distilled") to `folder`; same seed, same bytes.

    Keyword arguments change the transformer's config (TINY_TRANSFORMER), e.g. num_attention_heads=4."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline, flags, (scheduler, scheduler_config) = PIPELINES[variant]

    config = HeliosConfig(**{**TINY_TRANSFORMER, **transformer})
    _seeded(lambda: HeliosTransformer3DModel(config), seed).save_pretrained(folder / "transformer")
    _build_vae(seed + 1).save_pretrained(folder / "vae")
    _build_text_encoder(seed + 2).save_pretrained(folder / "text_encoder")
    _build_tokenizer().save_pretrained(folder / "tokenizer")

    _write_json(folder / "scheduler" / "scheduler_config.json", _meta(scheduler) | scheduler_config)
    _write_json(folder / "model_index.json", _meta(pipeline) | flags | {
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "HeliosTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    })
    return folder


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter from a seeded generator.

    Default inits leave norms at 1, biases and modulation tables at 0: a model built that way hides bugs that
    permute or drop those tensors. Matrices get N(0, 1/fan_in) so activations stay O(1) through the tiny stacks.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".gamma") or ("norm" in name and name.endswith("weight") and p.ndim == 1):
                p.copy_(1.0 + 0.1 * noise)  # norm gains (the Wan VAE names them gamma, shaped [C, 1, 1, 1])
            elif p.ndim >= 2 and not name.endswith("scale_shift_table"):
                p.copy_(noise * p[0].numel() ** -0.5)  # matrices and conv kernels: 1 / fan_in variance
            else:
                p.copy_(0.1 * noise)  # biases and modulation tables
    return module


def _seeded(build, seed: int) -> nn.Module:
    # Constructors draw their default init from the global RNG; fork it so building leaves the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return randomize_(build(), seed).eval()


def _build_vae(seed: int) -> nn.Module:
    from .vae import build_vae  # diffusers is imported by vae.py only

    return _seeded(build_vae, seed)


def _build_text_encoder(seed: int) -> nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    return _seeded(lambda: UMT5EncoderModel(UMT5Config(**TINY_UMT5)), seed)


def _build_tokenizer():
    """Word-level tokenizer with T5's conventions: lower-cased words, </s> appended, <pad> = 0 padding on the right."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *WORDS])}
    assert len(vocab) == len(SPECIAL_TOKENS) + len(WORDS) <= TINY_UMT5["vocab_size"], "duplicate or too many words"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _meta(class_name: str) -> dict:
    return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
