"""The checkpoint's own tokenizer, when its folder has one (read locally, never from a hub)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from traces.common.errors import TideError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(folder: str | Path) -> Any | None:
    """A transformers tokenizer from ``folder``, or None when the folder has no tokenizer files."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        import transformers
        from transformers import AutoTokenizer
        transformers.utils.logging.set_verbosity_error()  # it warns about config.json's unknown model type
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many error types for a bad tokenizer folder
        raise TideError(f"{folder}: tokenizer files present but unreadable ({str(exc).splitlines()[0]})") from None
