"""`var-jax download`: everything after the fetch, on local files."""

import pytest
from huggingface_hub import errors

from var_jax import checkpoint, cli
from var_jax.convert import download as dl
from var_jax.convert.load import ConvertError


def test_download_converts_fetched_files(golden_dir, tmp_path):
  calls = []

  def fetch(model, cache_dir):
    calls.append((model, cache_dir))
    return golden_dir / "vae_tiny.pth", golden_dir / "var_tiny.pth"

  out = tmp_path / "m"
  cfg = dl.download("d16", out, cache_dir="C", preset="tiny", fetch=fetch,
                    log=lambda _: None)
  assert calls == [("d16", "C")]
  assert cfg.var.depth == 2 and (out / "vae").exists() and (out / "var").exists()
  _, _, var = checkpoint.load_model(out)
  assert var.cfg.num_classes == 10


def test_files_must_match_the_model_preset(golden_dir, tmp_path):
  fetch = lambda m, c: (golden_dir / "vae_tiny.pth", golden_dir / "var_tiny.pth")
  with pytest.raises(ConvertError, match="preset disagrees.*vocab_size"):
    dl.download("d16", tmp_path / "m", fetch=fetch, log=lambda _: None)
  assert not (tmp_path / "m").exists()


def test_release_file_names():
  assert dl.checkpoint_files("d36") == ("vae_ch160v4096z32.pth",
                                        "var_d36.pth")
  with pytest.raises(dl.DownloadError, match="unknown model"):
    dl.checkpoint_files("d17")


@pytest.mark.parametrize("exc", [
    errors.LocalEntryNotFoundError("offline"),
    OSError("[Errno -2] Name or service not known"),
])
def test_no_network_is_one_line_and_writes_nothing(monkeypatch, tmp_path,
                                                   capsys, exc):
  import huggingface_hub

  def fail(*a, **k):
    raise exc

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
  out = tmp_path / "m"
  rc = cli.main(["download", "--model", "d16", "--out", str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert err[0].startswith("var-jax download: error:")
  assert "huggingface.co" in err[0] or "failed" in err[0]
  assert not out.exists()


def test_existing_output_is_kept(tmp_path, capsys):
  (tmp_path / "m").mkdir()
  rc = cli.main(["download", "--model", "d16", "--out", str(tmp_path / "m")])
  assert rc == 2 and "already exists" in capsys.readouterr().err
