"""The UMT5 text encoder (google/umt5-xxl in the published models) and its prompt cleaning.

Helios conditions on the UMT5 encoder's last hidden states, padded to a fixed length (512) with exact zeros: the
transformer's cross-attention has no mask, so the padding rows must be zeros, not the encoder's outputs there.
"""

from __future__ import annotations

import html
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, UMT5EncoderModel


def clean_prompt(text: str) -> str:
    """The reference's cleaning: fix mojibake, unescape HTML twice (doubly escaped scrapes), collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # str.split() splits on the same characters as the reference's `\s+` once ftfy / unescape have dropped the
    # C0 separators (0x1c-0x1f) on which `re` and `regex` disagree.
    return " ".join(text.split())


class TextEncoder:
    """Tokenizer + UMT5 encoder: prompts -> text embeddings [N, max_sequence_length, d_model]."""

    def __init__(self, model: UMT5EncoderModel, tokenizer):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, encoder: str | Path, tokenizer: str | Path, dtype: torch.dtype = torch.float32,
                        device="cpu") -> TextEncoder:
        """Load the encoder and tokenizer folders (a model folder's text_encoder/ and tokenizer/)."""
        model = UMT5EncoderModel.from_pretrained(Path(encoder), dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(Path(tokenizer)))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        """[N, max_sequence_length, d_model] in the encoder's dtype; rows past each prompt's tokens are zero."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a string")
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,  # keeps the closing </s>
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        # Keep the first `length` rows of each prompt (the reference slices, then pads with zeros).
        lengths = mask.gt(0).sum(dim=1)  # [N]
        keep = torch.arange(hidden.shape[1], device=self.device) < lengths[:, None]  # [N, L]
        return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=self.device))
