#!/usr/bin/env python3
"""Refreshes tests/golden, the repository's copy of the golden set.

  python tools/refresh_golden.py [--src ../shared/golden]

The source is the reference set the official PyTorch code wrote. What is
copied from its top level:
- `.pth`, `.json` and other files: byte for byte (the converter is tested on
  the real files);
- each `.npz`: only the arrays that `tests/golden/kept_arrays.json` lists as
  kept (the ones some test reads), bit-identical, written with
  `np.savez_compressed`. A source array the manifest neither keeps nor drops
  stops the refresh: decide whether a test reads it, then list it;
- `README.md`: the copy keeps its own opening note (everything before the
  first `# ` heading) followed by the source's text verbatim.
In the folders whose files the tests read only in part (`SUBSET_DIRS`), the
files the copy already holds are refreshed (byte for byte, or an npz the
manifest lists as `folder/name.npz` through its kept arrays), the ones
`SUBSET_FILES` names are added when missing (in a folder the copy has), and
nothing else is added. Files whose content is already current are not
rewritten. Exits 1 with one line on stderr when the source or the manifest
is not usable.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from var_jax import io as var_io
from var_jax.errors import WriteError

_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEST = _ROOT / "tests" / "golden"
MANIFEST = "kept_arrays.json"
# Source folders of which the tests read a subset of the files.
SUBSET_DIRS = ("eval", "infinity")
# Files of those folders that the tests read: copied byte for byte even where
# the copy does not hold them yet.
SUBSET_FILES = {"eval": ("adm_eval.npz", "adm_eval_wide.npz",
                         "inception_io.npz", "inception_keys.json"),
                "infinity": ("README.md", "config.json", "golden_infinity.npz",
                             "infinity_tiny.pth", "vae_tiny.pth",
                             "manifest_vae_2b.json", "manifest_vae_8b.json",
                             "manifest_flan_t5_xl_encoder.json",
                             "manifest_infinity_2b.json",
                             "manifest_infinity_8b.json",
                             "t5_tiny/config.json",
                             "t5_tiny/model.safetensors")}


class RefreshError(Exception):
  """The source or the manifest cannot be used as they are."""


def readme_note(text: str) -> str:
  """The copy's own note: the lines before the first `# ` heading."""
  lines = text.splitlines(keepends=True)
  for i, line in enumerate(lines):
    if line.startswith("# "):
      return "".join(lines[:i])
  return text


def _same_npz(path: pathlib.Path, arrays: dict) -> bool:
  if not path.exists():
    return False
  with np.load(path) as z:
    if list(z.files) != list(arrays):
      return False
    return all(z[k].dtype == a.dtype and z[k].shape == a.shape
               and z[k].tobytes() == a.tobytes() for k, a in arrays.items())


def _kept_arrays(src: pathlib.Path, lists: dict) -> dict:
  """The manifest's kept arrays of `src`, in the source's order."""
  keep, drop = set(lists["keep"]), set(lists["drop"])
  with np.load(src) as z:
    have = set(z.files)
    unknown = sorted(have - keep - drop)
    if unknown:
      raise RefreshError(f"{src}: arrays neither kept nor dropped in {MANIFEST}: "
                       f"{unknown}")
    gone = sorted(keep - have)
    if gone:
      raise RefreshError(f"{src}: kept arrays missing from the source: {gone}")
    return {k: z[k] for k in z.files if k in keep}


def refresh(src: pathlib.Path, dest: pathlib.Path = DEST) -> list[str]:
  """Copies `src` into `dest` as described above; returns what changed.

  Everything is read and checked before the first file is written, so a
  refused source leaves `dest` as it was.
  """
  manifest = json.loads((dest / MANIFEST).read_text())["npz"]
  missing = sorted(n for n in manifest if not (src / n).is_file())
  if missing:
    raise RefreshError(f"{src}: {MANIFEST} lists files the source lacks: "
                       f"{missing}")
  writes = []  # (name, writer of the new content), only what changed.
  for s in sorted(p for p in src.iterdir() if p.is_file()):
    d = dest / s.name
    if s.suffix == ".npz":
      if s.name not in manifest:
        raise RefreshError(f"{s}: not in {dest / MANIFEST}; list which of "
                           "its arrays the tests read")
      arrays = _kept_arrays(s, manifest[s.name])
      if not _same_npz(d, arrays):
        writes.append((s.name, lambda fh, a=arrays: np.savez_compressed(fh,
                                                                        **a)))
      continue
    data = s.read_bytes()
    if s.name == "README.md":
      note = readme_note(d.read_text()) if d.exists() else ""
      data = note.encode() + data
    if not d.exists() or d.read_bytes() != data:
      writes.append((s.name, lambda fh, b=data: fh.write(b)))
  for sub in SUBSET_DIRS:
    if not (dest / sub).is_dir():
      continue
    held = {p.relative_to(dest / sub).as_posix()
            for p in (dest / sub).rglob("*") if p.is_file()}
    for name in sorted(held | set(SUBSET_FILES.get(sub, ()))):
      d, s, rel = dest / sub / name, src / sub / name, f"{sub}/{name}"
      if not s.is_file():
        what = "holds" if name in held else "needs"
        raise RefreshError(f"{s}: the copy {what} {rel} but the source "
                           "does not")
      if rel in manifest:  # An npz the tests read some arrays of.
        arrays = _kept_arrays(s, manifest[rel])
        if not _same_npz(d, arrays):
          writes.append((rel, lambda fh, a=arrays: np.savez_compressed(fh,
                                                                      **a)))
        continue
      data = s.read_bytes()
      if not d.exists() or d.read_bytes() != data:
        writes.append((rel, lambda fh, b=data: fh.write(b)))
  for name, write in writes:
    (dest / name).parent.mkdir(parents=True, exist_ok=True)
    var_io.atomic_file(dest / name, write)
  return [name for name, _ in writes]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--src", type=pathlib.Path,
                  default=_ROOT.parent / "shared" / "golden",
                  help="the golden set to copy from (default ../shared/golden)")
  args = ap.parse_args(argv)
  if not (args.src / "README.md").is_file():
    print(f"refresh_golden: error: {args.src} is not a golden set (no "
          "README.md)", file=sys.stderr)
    return 1
  try:
    changed = refresh(args.src)
  except (RefreshError, WriteError) as e:
    print(f"refresh_golden: error: {e}", file=sys.stderr)
    return 1
  for name in changed:
    print(f"updated {DEST / name} ({(DEST / name).stat().st_size} bytes)")
  print(f"{len(changed)} file(s) updated in {DEST}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
