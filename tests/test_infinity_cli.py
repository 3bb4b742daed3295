"""`var-jax convert-infinity` and `var-jax t2i` on the golden set's tiny
Infinity (its transformer, tokenizer and T5 files, with a word-level
stand-in for flan-t5's tokenizer.json)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from var_jax import cli


@pytest.fixture(scope="module")
def t5_dir(golden_dir, tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  d = tmp_path_factory.mktemp("t5")
  for name in ("config.json", "model.safetensors"):
    shutil.copy(golden_dir / "infinity" / "t5_tiny" / name, d / name)
  words = ["a", "cat", "on", "the", "mat", "dog", "red", "sky"]
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2,
           **{w: i + 3 for i, w in enumerate(words)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", 1)])
  tok.save(str(d / "tokenizer.json"))
  return d


@pytest.fixture(scope="module")
def model_dir(golden_dir, t5_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("inf") / "model"
  g = golden_dir / "infinity"
  assert cli.main(["convert-infinity", "--infinity",
                   str(g / "infinity_tiny.pth"), "--tokenizer",
                   str(g / "vae_tiny.pth"), "--text-encoder", str(t5_dir),
                   "--out", str(out)]) == 0
  return out


def test_conversion_writes_one_directory(model_dir):
  cfg = json.loads((model_dir / "config.json").read_text())
  assert cfg["family"] == "infinity"
  assert cfg["infinity"]["depth"] == 2 and cfg["tokenizer"]["codebook_dim"] == 16
  assert cfg["text_encoder"]["d_model"] == 256
  assert sorted(p.name for p in model_dir.iterdir()) == [
      "config.json", "infinity", "text_encoder", "tokenizer",
      "tokenizer.json"]


def test_mismatched_files_write_nothing(golden_dir, tmp_path, capsys):
  g = golden_dir / "infinity"
  bad_t5 = tmp_path / "t5"
  bad_t5.mkdir()
  cfg = json.loads((g / "t5_tiny" / "config.json").read_text())
  (bad_t5 / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj":
                                                  "relu"}))
  rc = cli.main(["convert-infinity", "--infinity", str(g / "infinity_tiny.pth"),
                 "--tokenizer", str(g / "vae_tiny.pth"), "--text-encoder",
                 str(bad_t5), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and len(err.splitlines()) == 1 and "gated-gelu" in err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--aspect", "7:3"], "no schedule for height/width 2.333"),
    (["--aspect", "wide"], "expected height:width"),
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "a " * 600], "prompt 0 is 601 tokens: the text encoder "
     "takes at most 512"),
    (["--tau", "0"], "tau must be > 0"),
    (["--out-ext"], "is not an image format"),
    (["--cfg-insertion-layer", "-5"], "cfg_insertion_layer must be 0")])
def test_bad_requests_are_one_line_and_write_nothing(model_dir, tmp_path,
                                                     capsys, argv, needle):
  out = tmp_path / ("x.gif" if argv == ["--out-ext"] else "x.png")
  argv = [] if argv == ["--out-ext"] else argv
  if "--prompt" not in argv:
    argv = argv + ["--prompt", "a cat"]
  rc = cli.main(["t2i", "--ckpt", str(model_dir), "--resolution", "256",
                 "--out", str(out), *argv])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and len(err.splitlines()) == 1, err
  assert needle in err and not out.exists()


def test_a_var_directory_is_not_an_infinity_one(tmp_path, capsys):
  d = tmp_path / "m"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"name": "tiny"}))
  rc = cli.main(["t2i", "--ckpt", str(d), "--prompt", "a cat", "--out",
                 str(tmp_path / "x.png")])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and "is not an Infinity model directory" in err


@pytest.mark.slow  # Compiles the text encoder and the sampler.
def test_prompts_become_images(model_dir, tmp_path, capsys):
  rc = cli.main(["t2i", "--ckpt", str(model_dir), "--resolution", "256",
                 "--prompt", "a red cat", "--prompt", "the dog on the mat",
                 "--negative-prompt", "sky", "--seed", "5", "--out",
                 str(tmp_path / "many")])
  assert rc == 0, capsys.readouterr().err
  many = [np.asarray(Image.open(tmp_path / "many" / f"{i:06d}.png"))
          for i in range(2)]
  assert all(m.shape == (256, 256, 3) for m in many)
  assert not np.array_equal(many[0], many[1])
  # The first prompt alone, same seed: the same image (its keys are its own).
  rc = cli.main(["t2i", "--ckpt", str(model_dir), "--resolution", "256",
                 "--prompt", "a red cat", "--negative-prompt", "sky",
                 "--seed", "5", "--out", str(tmp_path / "one.png")])
  assert rc == 0
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")),
                                many[0])


@pytest.fixture
def fake_hub(golden_dir, t5_dir, tmp_path, monkeypatch):
  """hf_hub_download serving official-layout files: the tiny transformer
  and tokenizer under the released names, flan-t5-xl as two shards."""
  import huggingface_hub
  from safetensors.numpy import load_file, save_file
  t5 = tmp_path / "hub" / "flan-t5-xl"
  t5.mkdir(parents=True)
  sd = load_file(str(t5_dir / "model.safetensors"))
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for f, keys in shards.items():
    save_file({k: sd[k] for k in keys}, str(t5 / f))
  (t5 / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(t5_dir / name, t5 / name)
  g = golden_dir / "infinity"
  files = {("FoundationVision/Infinity", "infinity_2b_reg.pth"):
           g / "infinity_tiny.pth",
           ("FoundationVision/Infinity", "infinity_vae_d32reg.pth"):
           g / "vae_tiny.pth"}
  calls = []

  def hf_hub_download(repo_id, filename, **kwargs):
    calls.append((repo_id, filename))
    if repo_id == "google/flan-t5-xl":
      return str(t5 / filename)
    return str(files[(repo_id, filename)])

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
  return calls


def test_download_fetches_and_converts(fake_hub, tmp_path, capsys):
  out = tmp_path / "inf2b"
  assert cli.main(["download", "--infinity", "2b", "--out", str(out)]) == 0
  assert "wrote Infinity 2b" in capsys.readouterr().out
  assert sorted(f for _, f in fake_hub) == sorted([
      "config.json", "infinity_2b_reg.pth", "infinity_vae_d32reg.pth",
      "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "tokenizer.json"])
  assert json.loads((out / "config.json").read_text())["family"] == "infinity"
  # An existing directory is refused before anything is fetched.
  fake_hub.clear()
  rc = cli.main(["download", "--infinity", "2b", "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and "already exists" in err and fake_hub == []
