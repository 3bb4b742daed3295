"""The repository's golden copy (tests/golden) against its manifest and source.

tests/golden is a trimmed copy of the reference set the official PyTorch code
wrote (../shared/golden): the `.pth` and `.json` files byte for byte, and of
each top-level npz exactly the arrays `kept_arrays.json` keeps (the ones the
tests read), bit-identical. The manifest checks run everywhere. When the
source sits beside the repository, the comparisons prove the copy is current,
so a refresh of the source that is not copied over (tools/refresh_golden.py)
fails here instead of going unnoticed; in a clone without the source they are
not collected (not skipped).
"""

import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest
from conftest import IN_REPO_GOLDEN, SHARED_GOLDEN

# Under these folders the tests read only some files: the copy holds a subset
# of the source's files (and of each file's arrays), each of them identical.
_SUBSET_OK = ("eval", "infinity")
_MANIFEST = json.loads((IN_REPO_GOLDEN / "kept_arrays.json").read_text())["npz"]


def _refresh_tool():
  path = pathlib.Path(__file__).parents[1] / "tools" / "refresh_golden.py"
  spec = importlib.util.spec_from_file_location("refresh_golden", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _files(root):
  return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _readme_note(text):
  """The copy's own note: the lines before the first `# ` heading."""
  lines = text.splitlines(keepends=True)
  heads = [i for i, line in enumerate(lines) if line.startswith("# ")]
  return "".join(lines[:heads[0]]) if heads else text


def test_in_repo_copy_is_complete():
  names = {str(p) for p in _files(IN_REPO_GOLDEN)}
  need = {"README.md", "kept_arrays.json", "config_tiny.json",
          "manifest_official.json", "vae_tiny.pth", "var_tiny.pth",
          "var_tiny_saln512.pth", "var_tiny_refiner.pth", *_MANIFEST}
  assert need <= names, sorted(need - names)
  top_npz = {n for n in names if n.endswith(".npz") and "/" not in n}
  top_listed = {n for n in _MANIFEST if "/" not in n}
  assert top_npz == top_listed, "every top-level npz needs a manifest entry"
  # A listed npz in a subset folder holds the listed arrays (the test below).
  assert all(n.split("/")[0] in _SUBSET_OK for n in set(_MANIFEST) - top_listed)


@pytest.mark.parametrize("name", sorted(_MANIFEST))
def test_npz_holds_exactly_the_kept_arrays(name):
  keep, drop = _MANIFEST[name]["keep"], _MANIFEST[name]["drop"]
  assert keep, f"{name}: keeps nothing; remove the file instead"
  assert len(set(keep)) == len(keep) and not set(keep) & set(drop), name
  with np.load(IN_REPO_GOLDEN / name) as z:
    missing = sorted(set(keep) - set(z.files))
    extra = sorted(set(z.files) - set(keep))
  assert not missing, f"{name}: tests read these, copy them: {missing}"
  assert not extra, f"{name}: arrays not in its manifest `keep`: {extra}"


def test_readme_opens_with_the_refresh_note():
  note = _readme_note((IN_REPO_GOLDEN / "README.md").read_text())
  assert "tools/refresh_golden.py" in note and "kept_arrays.json" in note


def test_refresh_stops_on_an_array_the_manifest_does_not_name(tmp_path):
  tool = _refresh_tool()
  src, dest = tmp_path / "src", tmp_path / "dest"
  src.mkdir()
  dest.mkdir()
  (src / "README.md").write_text("# Golden\n")
  (dest / "kept_arrays.json").write_text(json.dumps(
      {"npz": {"a.npz": {"keep": ["x"], "drop": ["y"]}}}))
  np.savez(src / "a.npz", x=np.arange(3), y=np.ones(2), z=np.zeros(1))
  with pytest.raises(tool.RefreshError, match=r"neither kept nor dropped.*'z'"):
    tool.refresh(src, dest)
  assert [p.name for p in dest.iterdir()] == ["kept_arrays.json"]
  np.savez(src / "a.npz", x=np.arange(3), y=np.ones(2))
  assert tool.refresh(src, dest) == ["README.md", "a.npz"]
  with np.load(dest / "a.npz") as z:
    assert z.files == ["x"] and z["x"].tolist() == [0, 1, 2]
  assert tool.refresh(src, dest) == []  # Already current: nothing rewritten.


def _assert_npz_equal(ours, src, keep=None):
  """Every array of `ours` equals the source's; `keep` (if given) is exactly
  what `ours` holds and, with the manifest's drops, all the source has."""
  with np.load(ours) as a, np.load(src) as b:
    assert set(a.files) <= set(b.files), sorted(set(a.files) - set(b.files))
    if keep is not None:
      listed = set(keep["keep"]) | set(keep["drop"])
      assert set(b.files) == listed, (
          f"{src.name}: decide for {sorted(set(b.files) - listed)} and drop "
          f"{sorted(listed - set(b.files))} in kept_arrays.json")
    for k in a.files:
      x, y = a[k], b[k]
      assert (x.dtype, x.shape) == (y.dtype, y.shape), (k, x.dtype, y.dtype)
      # Bit-identical, NaNs included: compare the raw bytes.
      assert x.tobytes() == y.tobytes(), f"{ours.name}: {k} differs"


if (SHARED_GOLDEN / "README.md").exists():

  def test_every_source_file_is_copied():
    ours = set(_files(IN_REPO_GOLDEN))
    missing = [str(p) for p in _files(SHARED_GOLDEN)
               if p not in ours and p.parts[0] not in _SUBSET_OK]
    assert not missing, f"copy these from {SHARED_GOLDEN}: {missing}"

  @pytest.mark.parametrize("rel", [str(p) for p in _files(IN_REPO_GOLDEN)
                                   if str(p) != "kept_arrays.json"])
  def test_copy_equals_source(rel):
    ours, src = IN_REPO_GOLDEN / rel, SHARED_GOLDEN / rel
    assert src.exists(), f"{rel} is not in {SHARED_GOLDEN}"
    if ours.suffix == ".npz":
      subset = rel.split("/")[0] in _SUBSET_OK
      assert subset or rel in _MANIFEST, rel
      _assert_npz_equal(ours, src, _MANIFEST.get(rel))
    elif rel == "README.md":  # The refresh note, then the source verbatim.
      text = ours.read_text()
      assert text == _readme_note(text) + src.read_text(), (
          "README.md: rerun tools/refresh_golden.py")
    else:  # .pth files byte for byte: the converter reads the real bytes.
      assert ours.read_bytes() == src.read_bytes(), rel

  def test_refresh_tool_rebuilds_this_copy(tmp_path):
    # The tool, run on the source into an empty directory that holds only
    # the manifest and the note, writes what is committed here.
    for name in ("kept_arrays.json", "README.md"):
      shutil.copy(IN_REPO_GOLDEN / name, tmp_path / name)
    _refresh_tool().refresh(SHARED_GOLDEN, tmp_path)
    ours = [p for p in _files(IN_REPO_GOLDEN) if p.parts[0] not in _SUBSET_OK]
    assert sorted(_files(tmp_path)) == ours
    for rel in ours:
      if rel.suffix == ".npz":
        with np.load(tmp_path / rel) as a, np.load(IN_REPO_GOLDEN / rel) as b:
          assert a.files == b.files, rel
          for k in a.files:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()
      else:
        assert (tmp_path / rel).read_bytes() == (IN_REPO_GOLDEN / rel).read_bytes()

  def test_refresh_tool_rebuilds_the_infinity_subset(tmp_path):
    # A subset folder the copy has gets the files the tests read, nested
    # ones included, and of a listed npz only its kept arrays.
    for name in ("kept_arrays.json", "README.md"):
      shutil.copy(IN_REPO_GOLDEN / name, tmp_path / name)
    (tmp_path / "infinity").mkdir()
    _refresh_tool().refresh(SHARED_GOLDEN, tmp_path)
    ours = [p for p in _files(IN_REPO_GOLDEN) if p.parts[0] == "infinity"]
    assert [p for p in _files(tmp_path) if p.parts[0] == "infinity"] == ours
    for rel in ours:
      if rel.suffix == ".npz":
        with np.load(tmp_path / rel) as a, np.load(IN_REPO_GOLDEN / rel) as b:
          assert a.files == b.files == _MANIFEST[str(rel)]["keep"], rel
      else:
        assert (tmp_path / rel).read_bytes() == (IN_REPO_GOLDEN / rel).read_bytes()
