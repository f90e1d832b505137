"""Loading tokenizers without transformers 4.57's false "incorrect regex pattern" warning.

transformers 4.57.3+ warns that a local tokenizer "will lead to incorrect tokenization" whenever the folder's
config.json was written by a 4.57.3–4.x transformers, whatever the model (transformers #44031). The pattern
it means is Mistral's: for any other model type the warning is false and the tokenizer is untouched.
Passing `fix_mistral_regex=False` says we know, so no warning is printed and nothing changes; for Mistral
model types the flag is left alone and the warning, which may be true there, still shows.
"""
from __future__ import annotations

from pathlib import Path

MISTRAL_REGEX_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")


def load_tokenizer(where: str | Path, model_type: str | None = None, **kwargs):
    from transformers import AutoTokenizer

    if model_type is not None and model_type not in MISTRAL_REGEX_TYPES:
        kwargs.setdefault("fix_mistral_regex", False)
    return AutoTokenizer.from_pretrained(str(where), **kwargs)
