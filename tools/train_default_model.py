"""Reproduces the bundled default model (var_jax/assets/digits) from scratch.

  python tools/train_default_model.py --workdir /tmp/digits [--install]

1. `var-jax train-vae --config train_vae_digits --data digits` trains the
   multi-scale tokenizer on sklearn's digits (64px, scales 1, 2, 3, 4).
2. `var-jax tokenize` encodes the train split once (the digits get no
   augmentation, so the tokens never change), then `var-jax train --config
   train_digits --data tokens:...` trains the VAR on the cached tokens.
3. Evaluation, printed as one JSON line and kept as `report.json`: the
   tokenizer's reconstruction PSNR on the held-out digits, and the share of
   samples (default sampling settings) that an independent scikit-learn
   classifier, trained on the real digits, assigns to the requested class.
4. `--install` stores the model directory in float16 inside the package and
   measures the report again on the stored weights.
5. `--refiner` then trains the collaborative-decoding refiner the same way
   (`var-jax tokenize` with the tokenizer, `var-jax train --config
   train_digits_refiner`: half the depth, half the steps) and prints the
   quality/speed table of `tools/digits_code_table.py`; with `--install` its
   transformer (no tokenizer copy: it is the bundled one) is stored in
   float16 as `var_jax/assets/digits_refiner`, which `var-jax sample --fast`
   uses. `--refiner-only` does only this, on the bundled model (how the
   shipped refiner was made).

Re-running resumes each stage from its checkpoints; finished stages are
skipped. Both stages run on the CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSET = ROOT / "var_jax" / "assets" / "digits"
REFINER_ASSET = ROOT / "var_jax" / "assets" / "digits_refiner"


def _run(argv: list[str]) -> float:
  print("+ " + " ".join(argv), file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  subprocess.run(argv, check=True)
  return time.perf_counter() - t0


def _stage(workdir: pathlib.Path, argv: list[str]) -> float:
  """Runs a training command unless its model directory already exists."""
  if (workdir / "model" / "config.json").exists():
    print(f"[skip] {workdir}/model exists", file=sys.stderr)
    return 0.0
  return _run(argv)


def evaluate(model_dir, per_class: int, seed: int = 0) -> dict:
  """PSNR of the tokenizer and classifier agreement of default samples."""
  import numpy as np
  from var_jax import checkpoint
  from var_jax.data import digits_eval
  from var_jax.sampling.var.sampler import SampleOptions, Sampler
  _, vae, var = checkpoint.load_model(model_dir, need_var=True)
  res = vae.cfg.resolution
  clf, real_acc = digits_eval.train_classifier(res)
  labels = np.repeat(np.arange(var.cfg.num_classes), per_class)
  out = Sampler(vae, var, SampleOptions())(labels, seed=seed)
  agree = digits_eval.agreement(clf, np.asarray(out.images_BHWC), labels)
  return {"tokenizer_val_psnr_db": round(digits_eval.tokenizer_psnr(vae, res),
                                         2),
          "classifier_val_acc_real": round(real_acc, 4),
          "sample_class_agreement": round(agree, 4),
          "samples": int(len(labels)), "sampling": "cfg 1.5, top-k 900, "
          "top-p 0.96, float32", "seed": seed}


def install(model_dir: pathlib.Path, per_class: int) -> dict:
  """Replaces the bundled model with `model_dir`, stored as float16.

  float16 halves the package size; loading casts back to float32. The
  report is measured on the stored weights, so it describes what ships.
  """
  import jax
  import numpy as np
  from flax import nnx
  from var_jax import checkpoint
  cfg, vae, var = checkpoint.load_model(model_dir, need_var=True)
  half = lambda m: jax.tree.map(lambda a: np.asarray(a, np.float16),
                                nnx.state(m).to_pure_dict())
  tmp = ASSET.with_name(".digits.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  checkpoint.save_model(tmp, cfg, half(vae), half(var))
  report = evaluate(tmp, per_class)
  (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
  old = ASSET.with_name(".digits.old")
  shutil.rmtree(old, ignore_errors=True)
  if ASSET.exists():
    ASSET.rename(old)
  tmp.rename(ASSET)
  shutil.rmtree(old, ignore_errors=True)
  return report


def install_refiner(model_dir: pathlib.Path) -> None:
  """Stores the refiner's transformer (float16, no tokenizer) in the package.

  The tokenizer is the bundled one (checked here, weights and config), so
  only `config.json` and `var/` ship.
  """
  import jax
  import numpy as np
  from flax import nnx
  from var_jax import checkpoint
  from var_jax.sampling.var import code
  cfg, vae, var = checkpoint.load_model(model_dir, need_var=True)
  _, bundled_vae, _ = checkpoint.load_model(None, need_var=False)
  code.check_same_tokenizer(bundled_vae, vae, "bundled", "refiner")
  half = jax.tree.map(lambda a: np.asarray(a, np.float16),
                      nnx.state(var).to_pure_dict())
  checkpoint.save_model(REFINER_ASSET, cfg, None, half, overwrite=True)


def refiner_stage(exe, workdir: pathlib.Path, tokenizer: pathlib.Path,
                  install: bool, per_class: int) -> None:
  """Trains the CoDe refiner on `tokenizer`'s codes, prints the table."""
  cache = workdir / "refiner_tokens.npz"
  if not cache.exists():
    _run(exe + ["tokenize", "--ckpt", str(tokenizer), "--data", "digits",
                "--out", str(cache)])
  ref_dir = workdir / "refiner"
  t = _stage(ref_dir, exe + ["train", "--config", "train_digits_refiner",
                             "--data", f"tokens:{cache}", "--vae-ckpt",
                             str(tokenizer), "--workdir", str(ref_dir)])
  print(f"refiner trained in {t:.0f} s", file=sys.stderr)
  if install:
    install_refiner(ref_dir / "model")
    print(f"installed into {REFINER_ASSET} (float16)", file=sys.stderr)
  _run([sys.executable, str(ROOT / "tools" / "digits_code_table.py"),
        "--refiner", str(REFINER_ASSET if install else ref_dir / "model"),
        "--per-class", str(per_class)])


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, type=pathlib.Path)
  p.add_argument("--per-class", type=int, default=100,
                 help="samples per class for the classifier check")
  p.add_argument("--install", action="store_true",
                 help="copy the result into var_jax/assets/digits")
  p.add_argument("--refiner", action="store_true",
                 help="also train the CoDe refiner and print the table")
  p.add_argument("--refiner-only", action="store_true",
                 help="only the refiner, on the bundled model's tokenizer")
  args = p.parse_args()
  exe = [sys.executable, "-m", "var_jax.cli"]
  if args.refiner_only:
    refiner_stage(exe, args.workdir, ASSET, args.install, args.per_class)
    return 0
  vae_dir, var_dir = args.workdir / "vae", args.workdir / "var"
  t_vae = _stage(vae_dir, exe + ["train-vae", "--config", "train_vae_digits",
                                 "--data", "digits", "--workdir",
                                 str(vae_dir)])
  cache = args.workdir / "tokens.npz"
  t_tok = 0.0 if cache.exists() else _run(
      exe + ["tokenize", "--ckpt", str(vae_dir / "model"), "--data", "digits",
             "--out", str(cache)])
  t_var = _stage(var_dir, exe + ["train", "--config", "train_digits",
                                 "--data", f"tokens:{cache}", "--vae-ckpt",
                                 str(vae_dir / "model"), "--workdir",
                                 str(var_dir)])
  report = evaluate(var_dir / "model", args.per_class)
  report.update(train_vae_s=round(t_vae, 1), tokenize_s=round(t_tok, 1),
                train_var_s=round(t_var, 1))
  (args.workdir / "report.json").write_text(json.dumps(report, indent=1))
  print(json.dumps(report))
  if args.install:
    shipped = install(var_dir / "model", args.per_class)
    print(json.dumps(shipped))
    print(f"installed into {ASSET} (float16)", file=sys.stderr)
  if args.refiner:
    # With --install the fresh tokenizer is now the bundled one.
    refiner_stage(exe, args.workdir, ASSET if args.install
                  else vae_dir / "model", args.install, args.per_class)
  return 0


if __name__ == "__main__":
  sys.exit(main())
