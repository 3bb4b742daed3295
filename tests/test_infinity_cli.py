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
    (["--prompt", "a " * 600], "prompt 0 is 601 tokens: the model "
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


@pytest.mark.parametrize("case,needle", [
    ("two_prompts_one_image", "names an image file, but 2 prompts write a "
     "folder"),
    ("existing_image", "exists; pass --overwrite to replace it"),
    ("image_name_is_a_folder", "is a folder; give an image file name"),
    ("prompts_not_utf8", "not UTF-8 text (byte 0)"),
    ("blank_prompts_file", "holds no prompts (blank lines are skipped)"),
    ("empty_negative", "--negative-prompt is empty"),
    ("nan_cfg", "cfg must be a finite number"),
    ("nan_aspect", "expected height:width")])
def test_bad_outputs_and_inputs_are_refused_before_loading(
    tmp_path, capsys, case, needle):
  # None of these reads the model: its directory does not even exist.
  out, argv = tmp_path / "x.png", ["--prompt", "a cat"]
  if case == "two_prompts_one_image":
    argv += ["--prompt", "a dog"]
  elif case == "existing_image":
    out.write_bytes(b"mine")
  elif case == "image_name_is_a_folder":
    out.mkdir()
  elif case in ("prompts_not_utf8", "blank_prompts_file"):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xff\xfe bad" if case == "prompts_not_utf8" else b"\n \n")
    argv = ["--prompts-file", str(f)]
    out = tmp_path / "folder"
  elif case == "empty_negative":
    argv += ["--negative-prompt", " "]
  elif case == "nan_cfg":
    argv += ["--cfg", "nan"]
  elif case == "nan_aspect":
    argv += ["--aspect", "nan:1"]
  before = sorted(p.name for p in tmp_path.rglob("*"))
  rc = cli.main(["t2i", "--ckpt", str(tmp_path / "absent"), "--out",
                 str(out), *argv])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and len(err.splitlines()) == 1 and needle in err, err
  assert sorted(p.name for p in tmp_path.rglob("*")) == before
  if case == "existing_image":
    assert out.read_bytes() == b"mine"


def test_convert_onto_a_file_is_refused_and_keeps_it(golden_dir, t5_dir,
                                                    tmp_path, capsys):
  g = golden_dir / "infinity"
  out = tmp_path / "precious.png"
  out.write_bytes(b"mine")
  base = ["convert-infinity", "--infinity", str(g / "infinity_tiny.pth"),
          "--tokenizer", str(g / "vae_tiny.pth"), "--text-encoder",
          str(t5_dir), "--out", str(out)]
  assert cli.main(base) != 0  # Before reading the checkpoints.
  assert "already exists; pass --overwrite" in capsys.readouterr().err
  assert cli.main(base + ["--overwrite"]) != 0
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "is a file, not a directory" in err
  assert out.read_bytes() == b"mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.png"]


def test_an_unknown_dtype_is_one_line(model_dir, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["t2i", "--ckpt", str(model_dir), "--prompt", "a cat",
              "--dtype", "float16", "--out", str(tmp_path / "x.png")])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code != 0 and "invalid choice: 'float16'" in err[-1]
  assert not (tmp_path / "x.png").exists()


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
  # bfloat16 blocks: an image of the same prompt, close to float32's.
  rc = cli.main(["t2i", "--ckpt", str(model_dir), "--resolution", "256",
                 "--prompt", "a red cat", "--negative-prompt", "sky",
                 "--seed", "5", "--dtype", "bfloat16", "--out",
                 str(tmp_path / "bf16.png")])
  assert rc == 0, capsys.readouterr().err
  bf16 = np.asarray(Image.open(tmp_path / "bf16.png")).astype(int)
  assert bf16.shape == (256, 256, 3)
  assert np.abs(bf16 - many[0]).mean() < 8


def _shard(sd: dict, folder, prefix: str = "model") -> None:
  """Writes `sd` as two safetensors shards and their index, as the Hub
  holds large checkpoints."""
  from safetensors.numpy import save_file
  names = sorted(sd)
  shards = {f"{prefix}-00001-of-00002.safetensors": names[::2],
            f"{prefix}-00002-of-00002.safetensors": names[1::2]}
  for f, keys in shards.items():
    save_file({k: np.ascontiguousarray(sd[k]) for k in keys},
              str(folder / f))
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))


def _not_found():
  """The error hf_hub_download raises for a file the repository lacks."""
  import importlib
  from huggingface_hub import errors
  cls = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
  for name in ("httpx2", "httpx"):
    try:
      http = importlib.import_module(name)
    except ImportError:
      continue
    return cls("404 Client Error. Entry Not Found", response=http.Response(
        404, request=http.Request("GET", "https://huggingface.co/x")))
  import requests
  response = requests.Response()
  response.status_code = 404
  return cls("404 Client Error. Entry Not Found", response=response)


@pytest.fixture
def fake_hub(golden_dir, t5_dir, tmp_path, monkeypatch):
  """hf_hub_download serving official-layout files: the tiny transformer
  under the 2B name and as the 8B folder of shards, the tiny tokenizer
  under both tokenizer names, flan-t5-xl as two shards; anything else is
  the hub's not-found error."""
  import huggingface_hub
  from safetensors.numpy import load_file
  from var_jax.convert.weights import read_state_dict
  t5 = tmp_path / "hub" / "flan-t5-xl"
  t5.mkdir(parents=True)
  _shard(load_file(str(t5_dir / "model.safetensors")), t5)
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(t5_dir / name, t5 / name)
  g = golden_dir / "infinity"
  big = tmp_path / "hub" / "infinity_8b_weights"
  big.mkdir()
  _shard(read_state_dict(g / "infinity_tiny.pth"), big)
  repo = "FoundationVision/Infinity"
  files = {(repo, "infinity_2b_reg.pth"): g / "infinity_tiny.pth",
           (repo, "infinity_vae_d32reg.pth"): g / "vae_tiny.pth",
           (repo, "infinity_vae_d56_f8_14_patchify.pth"): g / "vae_tiny.pth"}
  files.update({(repo, f"infinity_8b_weights/{f.name}"): f
                for f in big.iterdir()})
  calls = []

  def hf_hub_download(repo_id, filename, **kwargs):
    calls.append((repo_id, filename))
    if repo_id == "google/flan-t5-xl" and (t5 / filename).is_file():
      return str(t5 / filename)
    if (repo_id, filename) not in files:
      raise _not_found()
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


def test_download_8b_fetches_the_sharded_folder(fake_hub, tmp_path, capsys):
  out = tmp_path / "inf8b"
  assert cli.main(["download", "--infinity", "8b", "--out", str(out)]) == 0
  assert "wrote Infinity 8b" in capsys.readouterr().out
  got = [f for r, f in fake_hub if r == "FoundationVision/Infinity"]
  assert sorted(got) == [
      "infinity_8b_weights/model-00001-of-00002.safetensors",
      "infinity_8b_weights/model-00002-of-00002.safetensors",
      "infinity_8b_weights/model.safetensors.index.json",
      "infinity_vae_d56_f8_14_patchify.pth"]
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["infinity"]["depth"] == 2


def test_a_missing_index_falls_back_to_the_next_name(fake_hub, tmp_path):
  from var_jax.convert.hub import first_hub_file
  from var_jax.errors import DownloadError
  got = first_hub_file("google/flan-t5-xl", ["pytorch_model.bin.index.json",
                                             "model.safetensors.index.json"],
                       None, None)
  assert got.name == "model.safetensors.index.json"
  with pytest.raises(DownloadError, match="has none of a.json, b.json"):
    first_hub_file("google/flan-t5-xl", ["a.json", "b.json"], None, None)


def test_a_sharded_transformer_folder_converts(golden_dir, t5_dir, tmp_path,
                                               model_dir, capsys):
  from var_jax.convert.infinity import infinity as inf_convert
  from var_jax.convert.weights import read_state_dict
  g = golden_dir / "infinity"
  folder = tmp_path / "shards"
  folder.mkdir()
  sd = read_state_dict(g / "infinity_tiny.pth")
  _shard(sd, folder)
  back = inf_convert.read_transformer(folder)
  assert sorted(back) == sorted(sd)
  assert all(np.array_equal(back[k], sd[k]) for k in sd)
  out = tmp_path / "model"
  assert cli.main(["convert-infinity", "--infinity", str(folder),
                   "--tokenizer", str(g / "vae_tiny.pth"), "--text-encoder",
                   str(t5_dir), "--out", str(out)]) == 0
  assert (out / "config.json").read_text() == (
      model_dir / "config.json").read_text()
  (folder / "model-00002-of-00002.safetensors").unlink()
  capsys.readouterr()
  assert cli.main(["convert-infinity", "--infinity", str(folder),
                   "--tokenizer", str(g / "vae_tiny.pth"), "--text-encoder",
                   str(t5_dir), "--out", str(tmp_path / "m2")]) != 0
  err = capsys.readouterr().err.strip()
  assert "names shards the directory lacks: model-00002-of-00002" in err
  assert len(err.splitlines()) == 1 and not (tmp_path / "m2").exists()


def _t2i_folder(model_dir, prompts_file, out, *extra):
  return ["t2i", "--ckpt", str(model_dir), "--resolution", "256",
          "--prompts-file", str(prompts_file), "--seed", "3", "--out",
          str(out), *extra]


@pytest.mark.parametrize("setup,argv,needle", [
    ("foreign", [], "holds files of something else (notes.txt)"),
    ("none", ["--batch", "0"], "--batch 0 must be a positive multiple"),
    ("file", [], "is a file, not a directory")])
def test_a_folder_job_refuses_before_loading(model_dir, tmp_path, capsys,
                                             setup, argv, needle):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a cat\nthe dog\n")
  out = tmp_path / "out"
  if setup == "foreign":
    out.mkdir()
    (out / "notes.txt").write_text("mine")
  elif setup == "file":
    out.write_text("not a folder")
  before = sorted(p.name for p in tmp_path.rglob("*"))
  rc = cli.main(_t2i_folder(model_dir, prompts, out, *argv))
  err = capsys.readouterr().err.strip()
  assert rc != 0 and len(err.splitlines()) == 1 and needle in err, err
  assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.slow  # Several compiled samplers, one in a 2-device process.
def test_a_folder_job_resumes_and_splits_over_devices(model_dir, tmp_path,
                                                      capsys):
  import os
  import subprocess
  import sys
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red cat\nthe dog on the mat\nred sky\n")
  out = tmp_path / "out"
  assert cli.main(_t2i_folder(model_dir, prompts, out, "--batch", "2")) == 0
  names = sorted(p.name for p in out.iterdir())
  assert names == ["000000.png", "000001.png", "000002.png", "meta.json"]
  first = {n: (out / n).read_bytes() for n in names if n.endswith(".png")}
  # An interrupted job: the same command draws only what is missing.
  (out / "000001.png").unlink()
  capsys.readouterr()
  assert cli.main(_t2i_folder(model_dir, prompts, out, "--batch", "1")) == 0
  assert "wrote 1 images" in capsys.readouterr().out
  assert {n: (out / n).read_bytes() for n in first} == first
  # Other settings are refused, naming them; nothing changes.
  rc = cli.main(_t2i_folder(model_dir, prompts, out, "--tau", "0.7"))
  err = capsys.readouterr().err.strip()
  assert rc != 0 and "other settings (tau)" in err
  rc = cli.main(_t2i_folder(model_dir, prompts, out, "--dtype", "bfloat16"))
  assert rc != 0 and "other settings (dtype)" in capsys.readouterr().err
  prompts.write_text("a red cat\nthe dog on the mat\n")
  rc = cli.main(_t2i_folder(model_dir, prompts, out))
  assert rc != 0 and "other settings (prompts, total)" in (
      capsys.readouterr().err)
  assert {n: (out / n).read_bytes() for n in first} == first
  # Two devices, one batch split over them: the same images.
  prompts.write_text("a red cat\nthe dog on the mat\nred sky\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  two = tmp_path / "two"
  r = subprocess.run([sys.executable, "-m", "var_jax.cli",
                      *_t2i_folder(model_dir, prompts, two, "--batch", "2")],
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  for n in first:
    a = np.asarray(Image.open(out / n)).astype(int)
    b = np.asarray(Image.open(two / n)).astype(int)
    # Same bits; the decoder's convolutions may round a pixel differently
    # per batch shape.
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, n


def test_text_longer_than_the_null_text_is_one_line(t5_dir, tmp_path,
                                                    capsys):
  # The patchify reference transformer holds 64 rows of null text: a
  # longer prompt cannot be guided, and is refused as too long.
  import pathlib
  import infinity_models
  inf, vae = infinity_models.patchify_pth(
      pathlib.Path(__file__).parent / "reference" / "infinity_patchify",
      tmp_path)
  model = tmp_path / "model"
  assert cli.main(["convert-infinity", "--infinity", str(inf),
                   "--tokenizer", str(vae), "--text-encoder", str(t5_dir),
                   "--out", str(model)]) == 0
  capsys.readouterr()
  rc = cli.main(["t2i", "--ckpt", str(model), "--resolution", "256",
                 "--prompt", "a cat " * 40, "--out", str(tmp_path / "x.png")])
  err = capsys.readouterr().err.strip()
  assert rc != 0 and len(err.splitlines()) == 1, err
  assert "81 tokens" in err and "at most 64" in err, err
  assert not (tmp_path / "x.png").exists()
