"""Prompts to padded token ids through a repository's tokenizer.json."""

import numpy as np
import pytest

from var_jax.data.text import TextTokenizer
from var_jax.errors import DataError, UserError


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
  # A word-level stand-in for flan-t5's tokenizer.json, with the same
  # special tokens and the post-processor that appends </s>.
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "on": 5,
           "the": 6, "mat": 7}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", 1)])
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return path


def test_prompts_are_padded_with_an_end_token(tok_file):
  ids, mask = TextTokenizer.from_path(tok_file.parent, max_length=8).encode(
      ["a cat", "the cat on the mat"])
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == (2, 8)
  assert ids.tolist() == [[3, 4, 1, 0, 0, 0, 0, 0], [6, 4, 5, 6, 7, 1, 0, 0]]
  assert mask.sum(1).tolist() == [3, 6]
  assert (mask == (np.arange(8) < mask.sum(1, keepdims=True))).all()


@pytest.mark.parametrize("prompts,needle", [
    (["a", ""], "prompt 1 is empty"),
    (["a", 3], "prompt 1 is int, not text"),
    ("a cat", "prompts must be a list of strings, got str"),
    ([], "no prompts"),
    (["a cat on the mat a cat"], "prompt 0 is 8 tokens: the model "
     "takes at most 6")])
def test_bad_prompts_are_named(tok_file, prompts, needle):
  with pytest.raises(UserError) as e:
    TextTokenizer.from_path(tok_file, max_length=6).encode(prompts)
  assert needle in str(e.value)


def test_missing_or_bad_tokenizer_file(tmp_path):
  with pytest.raises(DataError, match="no such tokenizer file"):
    TextTokenizer.from_path(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(DataError, match="not a tokenizers file"):
    TextTokenizer.from_path(tmp_path)
