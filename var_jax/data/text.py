"""Prompts -> padded token ids for a T5 text encoder.

Reads the `tokenizer.json` a Hugging Face model repository ships (google/
flan-t5-xl's: a SentencePiece unigram model whose post-processor appends
`</s>`) with the `tokenizers` library, and pads every prompt to the same
length, as Infinity pads to 512. A prompt the encoder cannot take whole is
an error, not silently cut.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from var_jax.errors import DataError, UserError
from var_jax.io import as_path

TOKENIZER_FILE = "tokenizer.json"
INSTALL_HINT = ("pip install tokenizers (from a checkout: pip install "
                "'.[infinity]')")


class TextTokenizer:
  """`encode(prompts)` -> (ids_BT, mask_BT), int32, padded to `max_length`."""

  def __init__(self, tokenizer, max_length: int = 512):
    self._tok = tokenizer
    self.max_length = max_length
    pad = tokenizer.token_to_id("<pad>")
    self.pad_id = 0 if pad is None else int(pad)

  @classmethod
  def from_path(cls, path, max_length: int = 512) -> "TextTokenizer":
    """A `tokenizer.json`, or a directory holding one.

    Raises:
      DataError: no such file, or one the library cannot read; the
        `tokenizers` package missing (with the install command).
    """
    try:
      from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise DataError(f"reading prompts needs the tokenizers package: "
                      f"{INSTALL_HINT}") from None
    p = as_path(path)
    if p.is_dir():
      p = p / TOKENIZER_FILE
    if not p.is_file():
      raise DataError(f"{p}: no such tokenizer file (expected the "
                      f"{TOKENIZER_FILE} of the text encoder's repository)")
    try:
      tok = Tokenizer.from_str(p.read_text())
    except Exception as e:  # The library raises plain Exceptions.
      raise DataError(f"{p}: not a tokenizers file "
                      f"({' '.join(str(e).split())[:160]})") from None
    return cls(tok, max_length)

  def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the attention mask (1 = token), each (B, max_length).

    Raises:
      UserError: not a list of strings, an empty prompt, or one longer than
        `max_length` tokens (the end-of-text token included); all named.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
      raise UserError(f"prompts must be a list of strings, got "
                      f"{type(prompts).__name__}")
    bad = [f"prompt {i} is {type(p).__name__}, not text"
           for i, p in enumerate(prompts) if not isinstance(p, str)]
    bad += [f"prompt {i} is empty" for i, p in enumerate(prompts)
            if isinstance(p, str) and not p.strip()]
    if not prompts:
      bad.append("no prompts")
    if bad:
      raise UserError("; ".join(bad))
    encodings = self._tok.encode_batch(list(prompts))
    long = [f"prompt {i} is {len(e.ids)} tokens" for i, e in
            enumerate(encodings) if len(e.ids) > self.max_length]
    if long:
      raise UserError("; ".join(long) + f": the model takes at most "
                      f"{self.max_length}")
    ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), self.max_length), np.int32)
    for i, e in enumerate(encodings):
      ids[i, :len(e.ids)] = e.ids
      mask[i, :len(e.ids)] = 1
    return ids, mask
