"""Flags out of their domain, output paths and what the commands say.

Each case is refused (or answered) before a model is loaded, or exercises
the one function behind a message, so the file runs in about a second.
"""

import argparse
import os
import types

import numpy as np
from PIL import Image
import pytest

from var_jax import checkpoint, cli
from var_jax.errors import CheckpointError, IncompatibleModelsError, UserError
from var_jax.errors import WriteError
from var_jax.models.var.config import VQVAEConfig
from var_jax.sampling import images, jobs, many
from var_jax.sampling.var import code, edit


@pytest.fixture
def no_loading(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("the model was loaded before the flags were checked")
  monkeypatch.setattr(checkpoint, "load_model", refuse)
  monkeypatch.setattr(checkpoint, "load_config", refuse)


def _usage_error(capsys, argv):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  return err


# ------------------------------------------------------------------ domains
@pytest.mark.parametrize("ncol", ["0", "-2"])
def test_ncol_below_one_is_refused(tmp_path, capsys, ncol):
  err = _usage_error(capsys, ["sample", "--ncol", ncol, "--out",
                              str(tmp_path / "g.png")])
  assert err == (f"var-jax sample: error: argument --ncol: expected an "
                 f"integer >= 1, got '{ncol}'")
  assert list(tmp_path.iterdir()) == []


def test_grid_refuses_ncol_below_one():
  with pytest.raises(UserError, match=r"^ncol must be >= 1, got 0$"):
    images.grid(np.zeros((2, 4, 4, 3), np.float32), 0)
  assert images.grid(np.zeros((2, 4, 4, 3), np.float32), 5).shape == (
      8, 14, 3)  # More columns than images: one row of two.


@pytest.mark.parametrize("cmd,flag,text,needle", [
    ("sample", "--labels", "3,,7", "--labels '3,,7': entry 2 is empty"),
    ("sample", "--labels", "1,", "--labels '1,': entry 2 is empty"),
    ("sample", "--labels", ",,", "--labels ',,': entry 1 is empty"),
    ("sample", "--labels", "", "--labels '': entry 1 is empty"),
    ("sample-many", "--classes", "4,,", "--classes '4,,': entry 2 is empty"),
])
def test_empty_class_entries_are_refused_naming_the_entry(
    tmp_path, capsys, no_loading, cmd, flag, text, needle):
  out = tmp_path / ("o.png" if cmd == "sample" else "o.npz")
  rc = cli.main([cmd, flag, text, "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert err.startswith(f"var-jax {cmd}: error: {needle}; give "
                        "comma-separated class ids"), err
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ outputs
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_sample_many_unwritable_out_names_the_users_path():
  sampler = types.SimpleNamespace(
      check_labels=lambda c, allow_null=False: np.asarray(c))
  with pytest.raises(WriteError) as e:
    many.sample_many(sampler, [1], 1, 1, 0, "/proc/c.npz", {})
  assert str(e.value) == "no such file or directory writing /proc/c.npz"


def test_a_used_out_dir_is_refused_without_overwrite(tmp_path, capsys,
                                                     no_loading):
  d = tmp_path / "each"
  d.mkdir()
  (d / "00000_label1_seed0.png").write_bytes(b"x")
  (d / "notes.txt").write_text("x")
  rc = cli.main(["sample", "--out-dir", str(d)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert err == (f"var-jax sample: error: --out-dir {d} is not empty (2 "
                 "files: 00000_label1_seed0.png, notes.txt); give a new or "
                 "empty folder, or --overwrite to replace the samples there")
  assert sorted(p.name for p in d.iterdir()) == ["00000_label1_seed0.png",
                                                 "notes.txt"]


def test_overwrite_replaces_the_samples_and_keeps_other_files(tmp_path):
  d = tmp_path / "each"
  d.mkdir()
  for name in ("00000_label1_seed0.png", "00007_label3_seed0.png",
               "notes.txt", "cat.png"):
    (d / name).write_bytes(b"x")
  paths = images.save_each(d, np.zeros((2, 4, 4, 3), np.float32), [4, 5],
                           seed=1, replace=True)
  assert [p.name for p in paths] == ["00000_label4_seed1.png",
                                     "00001_label5_seed1.png"]
  assert sorted(p.name for p in d.iterdir()) == [
      "00000_label4_seed1.png", "00001_label5_seed1.png", "cat.png",
      "notes.txt"]


def test_the_success_line_names_the_sample_files():
  one = jobs.each_file_summary("out", ["out/00000_label7_seed3.png"])
  assert one == ["out/00000_label7_seed3.png"]
  names = [f"out/{n}" for n in images.sample_file_names([7] * 16, 3)]
  assert jobs.each_file_summary("out/", names) == [
      "out/ (16 PNG files, 00000_label7_seed3.png ... "
      "00015_label7_seed3.png)"]
  assert jobs.count(1, "sample") == "1 sample"
  assert jobs.count(16, "sample") == "16 samples"


# ------------------------------------------------------------------ help
def _help(path, option):
  parser = cli.build_parser()
  for name in path:
    sub = next(a for a in parser._actions
               if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[name]
  action = next(a for a in parser._actions if option in a.option_strings)
  return " ".join(parser._get_formatter()._format_action(action).split())


def test_help_texts_say_what_each_command_takes():
  assert "model name (digits, d16" in _help(["encode"], "--ckpt")
  for option in ("--scale-loop", "--layer-loop"):
    text = _help(["edit"], option)
    assert "--batch" not in text and "edit is one sampler call" in text, text
  for command in ("train", "train-vae"):
    for option in ("--global-batch", "--ckpt-every"):
      assert "(default: the config's" in _help([command], option), (
          command, option)


@pytest.mark.parametrize("argv,prefix", [
    (["sample-many", "--num", "20", "--out", "x.npz"],
     "var-jax sample-many: error: "
     "unrecognized arguments: --num 20"),
    (["bench", "sample", "--random-init", "--nope"],
     "var-jax bench sample: error: unrecognized arguments: --nope"),
])
def test_unknown_arguments_name_the_subcommand(capsys, argv, prefix):
  assert _usage_error(capsys, argv) == prefix


# ------------------------------------------------------------------ messages
def test_box_errors_say_fractions_or_pixels():
  with pytest.raises(UserError) as e:
    jobs._parse_box("0,0,100,100", 64)
  assert str(e.value) == (
      "--box 0,0,100,100 is outside the image: give fractions in [0, 1] of "
      "the image side, or pixels in [0, 64] of the model's 64x64 resolution")
  assert jobs._parse_box("0,0,32,64", 64) == [0, 0, 0.5, 1]
  with pytest.raises(UserError, match=r"^box \(y0, x0, y1, x1\) is fractions "
                     r"in \[0, 1\] of the image side"):
    edit.box_mask(4, (0.5, 0, 0.4, 1), inpaint=True)


def test_image_range_hint_fits_the_input():
  with pytest.raises(UserError, match=r"got values in \[-1, 1\]; map "
                     r"\[-1, 1\] images with \(x \+ 1\) / 2$"):
    edit.check_images(np.linspace(-1, 1, 48).reshape(1, 4, 4, 3), 4)
  with pytest.raises(UserError, match=r"got values in \[0, 255\]; divide "
                     "8-bit pixels by 255$"):
    edit.check_images(np.linspace(0, 255, 48).reshape(1, 4, 4, 3), 4)


def test_a_missing_model_directory_is_named_as_typed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(CheckpointError, match=r"^\./digits is not a var-jax "
                     "model directory"):
    checkpoint.load_config("./digits")


def test_differing_tokenizers_name_both_values():
  a = VQVAEConfig()
  b = VQVAEConfig(vocab_size=a.vocab_size * 2,
                  v_patch_nums=tuple(a.v_patch_nums[:-1]))
  with pytest.raises(IncompatibleModelsError) as e:
    code.check_same_tokenizer(types.SimpleNamespace(cfg=a),
                              types.SimpleNamespace(cfg=b))
  assert str(e.value).startswith(
      f"the drafter and refiner tokenizers differ (vocab_size: drafter "
      f"{a.vocab_size}, refiner {b.vocab_size}; v_patch_nums: drafter "
      f"{tuple(a.v_patch_nums)}, refiner {tuple(b.v_patch_nums)}); "), e.value


@pytest.mark.parametrize("cmd", ["sample", "sample-many"])
def test_the_commands_name_a_missing_model_directory_as_typed(
    tmp_path, monkeypatch, capsys, cmd):
  monkeypatch.chdir(tmp_path)
  rc = cli.main([cmd, "--ckpt", "./digits", "--out",
                 "o.png" if cmd == "sample" else "o.npz"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.startswith(
      f"var-jax {cmd}: error: ./digits is not a var-jax model directory"), err


def test_a_grid_named_like_an_out_dir_sample_is_refused(tmp_path, capsys,
                                                        no_loading):
  d = tmp_path / "each"
  grid = d / "00001_label7_seed0.png"
  rc = cli.main(["sample", "--labels", "3,7", "--out-dir", str(d), "--out",
                 str(grid)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert err.startswith(f"var-jax sample: error: --out {grid} is a sample "
                        f"file name in --out-dir {d}"), err
  assert not d.exists()


def test_a_box_mixing_fractions_and_pixels_is_refused():
  for text in ("0.1,0.1,1.2,0.8", "0.5,0.5,2,2"):
    with pytest.raises(UserError, match=r"mixes fractions and pixels"):
      jobs._parse_box(text, 64)


@pytest.mark.slow  # Loads the bundled model (the box needs its token grid).
@pytest.mark.parametrize("mode,box", [("inpaint", "0,0,0.01,0.01"),
                                      ("outpaint", "0,0,1,1")])
def test_an_edit_that_keeps_every_token_is_refused(tmp_path, capsys, mode,
                                                   box):
  # A sub-token box to inpaint, the whole image to outpaint: nothing to draw.
  src = tmp_path / "in.png"
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src)
  rc = cli.main(["--no-compile-cache", "edit", "--image", str(src), "--box",
                 box, "--mode", mode, "--out", str(tmp_path / "e.png")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.splitlines()[-1].startswith(
      f"var-jax edit: error: --box {box} leaves nothing to {mode}"), err
  assert not (tmp_path / "e.png").exists()
