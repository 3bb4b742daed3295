"""Folder splits and the held-out evaluation of `train` and `train-vae`.

`val` and `validation` are one split, whichever folder exists; evaluation
is chosen or skipped with `--eval-split NAME|none` and sized with
`--eval-batch N`; every refusal is one line naming the config field and the
flag, before anything is written.
"""

import json

import numpy as np
import pytest
from PIL import Image

from var_jax import cli
from var_jax.data import make_loader
from var_jax.data.sources import AugConfig, FolderSource, SplitMissingError


def _folder(root, splits=(("train", 16), ("val", 8)), classes=2):
  """root/<split>/c<k>/<i>.png, a flat gray per image."""
  for split, n in splits:
    for k in range(classes):
      d = root / split / f"c{k}" if split else root / f"c{k}"
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        a = np.full((20, 20, 3), 40 * k + i, np.uint8)
        Image.fromarray(a).save(d / f"{i}.png")
  return root


@pytest.mark.parametrize("folder,split", [("validation", "val"),
                                          ("val", "validation")])
def test_val_and_validation_are_one_split(tmp_path, folder, split):
  _folder(tmp_path, (("train", 2), (folder, 3)))
  ld = make_loader(f"folder:{tmp_path}", split=split, resolution=8,
                   global_batch=2, seed=0, num_workers=0, shuffle=False,
                   num_epochs=1)
  assert ld.num_examples == 6
  assert str(ld.source.root) == str(tmp_path / folder)
  ld.close()


def test_missing_split_names_the_folders_tried(tmp_path):
  _folder(tmp_path, (("train", 1),))
  with pytest.raises(SplitMissingError) as e:
    FolderSource(str(tmp_path), "validation", AugConfig(8, train=False))
  assert str(e.value) == (
      f"split directory missing: no {tmp_path}/validation or {tmp_path}/val "
      f"for split 'validation' ({tmp_path} has train/)")


def _cli(capsys, argv):
  rc = cli.main(argv)
  return rc, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def vae_dir(random_digits_vae_dir):
  return random_digits_vae_dir


def _argv(command, workdir, vae_dir, data, *extra):
  config = "train_tiny" if command == "train" else "train_vae_tiny"
  weights = ["--vae-ckpt", str(vae_dir)] if command == "train" else []
  return [command, "--config", config, "--workdir", str(workdir), "--data",
          data, *weights, *extra]


EVAL = "(config eval_split, --eval-split; 'none' skips evaluation)"


@pytest.mark.parametrize("command", ["train", "train-vae"])
@pytest.mark.parametrize("case", ["small_val", "no_val", "flat", "batch_0",
                                  "big_train"])
def test_eval_refusals_name_field_and_flag(capsys, tmp_path, vae_dir,
                                           command, case):
  data = tmp_path / "data"
  extra = ["--eval-split", "val"]  # train_vae_tiny's own; train_tiny has none.
  if case == "small_val":  # 2 x 8 held-out images, a batch of 60.
    _folder(data)
    extra += ["--eval-batch", "60"]
    want = (f"eval batch 60 (config eval_batch, --eval-batch) exceeds the 16 "
            f"examples of folder:{data} split 'val' ({data}/val)")
  elif case == "no_val":
    _folder(data, (("train", 16),))
    want = (f"eval split 'val' {EVAL}: split directory missing: no {data}/val"
            f" or {data}/validation for split 'val' ({data} has train/)")
  elif case == "flat":  # Class folders directly under the root.
    _folder(data, ((None, 16),))
    want = f"eval split 'val' {EVAL} would read the training images: {data}"
  elif case == "batch_0":
    _folder(data)
    extra += ["--eval-batch", "0"]
    want = "eval_batch must be >= 1 (--eval-batch)"
  else:
    _folder(data)
    extra += ["--global-batch", "40"]
    want = (f"global batch 40 (config global_batch, --global-batch) exceeds "
            f"the 32 examples of folder:{data} split 'train' ({data}/train)")
  rc, err = _cli(capsys, _argv(command, tmp_path / "w", vae_dir,
                               f"folder:{data}", *extra))
  assert rc == 2 and len(err) == 1, err
  assert want in err[0], (want, err[0])
  assert not (tmp_path / "w").exists()


def test_token_cache_has_no_eval_split(capsys, tmp_path, vae_dir):
  cache = tmp_path / "tok.npz"
  np.savez(cache, tokens=np.zeros((16, 30), np.int32),
           labels=np.zeros(16, np.int32), patch_nums=np.array([1, 2, 3, 4]),
           num_classes=np.int32(10), vocab_size=np.int32(512))
  rc, err = _cli(capsys, _argv("train", tmp_path / "w", vae_dir,
                               f"tokens:{cache}", "--eval-split", "val"))
  assert rc == 2 and len(err) == 1, err
  assert "is a token cache, which has one split" in err[0], err
  assert "--eval-split none" in err[0], err


@pytest.mark.slow  # End to end: a whole training run.
def test_eval_split_none_trains_without_a_val_folder(capsys, tmp_path):
  """The newcomer's case: only train/, and the tokenizer config evaluates
  on `val`; `--eval-split none` runs, and nothing is evaluated."""
  data = _folder(tmp_path / "data", (("train", 8),))
  work = tmp_path / "w"
  rc, err = _cli(capsys, ["train-vae", "--config", "train_vae_tiny",
                          "--workdir", str(work), "--data", f"folder:{data}",
                          "--steps", "2", "--eval-split", "none"])
  assert rc == 0, err
  last = [json.loads(l) for l in
          (work / "metrics.jsonl").read_text().splitlines()][-1]
  assert last["step"] == 1 and "val_psnr" not in last
  assert (work / "model" / "config.json").exists()
  # Not a terminal: whole lines, the bar's last report before the done line.
  assert not any("\r" in l for l in err), err
  assert err[-2].startswith("train-vae: 100%| 2/2 step, "), err
  assert err[-1] == f"[train-vae] done: 2 steps; model directory {work}/model"
