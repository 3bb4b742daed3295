"""`var-jax download`: everything after the fetch, on local files.

The real fetch needs huggingface.co; here `huggingface_hub.hf_hub_download`
(or the whole fetch) is replaced by one that returns the golden tiny .pth
files or raises the exceptions the hub and HTTP clients really raise. A
CoDe pair is served as the golden drafter (`var_tiny.pth`) and refiner
(`var_tiny_refiner.pth`), official-layout files written by torch.save, under
the release's names.
"""

import importlib
import logging
import sys

import numpy as np
import pytest
# The hub's package logger gets a StreamHandler bound to the sys.stderr of the
# moment huggingface_hub.utils.logging is first imported (lazily, by the first
# access to e.g. huggingface_hub.hf_hub_download). Imported here, at
# collection, that is pytest's session-long stream; imported inside a test
# that uses capsys, it would be that test's stream, closed afterwards, and a
# later hub warning would print a "Logging error" traceback instead.
import huggingface_hub.utils.logging  # noqa: F401
from huggingface_hub import errors

from var_jax import checkpoint, cli
from var_jax.models.var.config import get_preset
from var_jax.convert.var import download as dl
from var_jax.convert.var.load import ConvertError
from var_jax.errors import IncompatibleModelsError


def run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture
def fake_hub(golden_dir, monkeypatch):
  """hf_hub_download serving the golden files; records each call."""
  import huggingface_hub
  calls = []
  drafter = golden_dir / "var_tiny.pth"
  refiner = golden_dir / "var_tiny_refiner.pth"
  local = {dl.VAE_FILE: golden_dir / "vae_tiny.pth",
           "var_d16.pth": drafter, "var_d30.pth": drafter,
           "var_d20.pth": refiner, "drafter_6.pth": drafter,
           "refiner_6.pth": refiner}

  def hf_hub_download(repo_id, filename, **kwargs):
    calls.append((repo_id, filename, kwargs))
    return str(local[filename])

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
  return calls


def test_download_converts_fetched_files(golden_dir, tmp_path):
  calls = []

  def fetch(model, cache_dir, pth_dir):
    calls.append((model, cache_dir, pth_dir))
    return golden_dir / "vae_tiny.pth", golden_dir / "var_tiny.pth"

  out = tmp_path / "m"
  cfg = dl.download("d16", out, cache_dir="C", preset="tiny", fetch=fetch,
                    log=lambda _: None)
  assert calls == [("d16", "C", None)]
  tiny = get_preset("tiny")
  assert cfg.var == tiny.var and cfg.vae == tiny.vae
  loaded, _, var = checkpoint.load_model(out)
  assert loaded.var == tiny.var and var.cfg.num_classes == 10


def test_cli_download_through_fake_hub(fake_hub, tmp_path, capsys):
  out = tmp_path / "m"
  code, stdout, err = run(capsys, "download", "--model", "d16", "--out",
                          str(out), "--cache-dir", str(tmp_path / "hf"),
                          "--pth-dir", str(tmp_path / "pth"),
                          "--preset", "tiny")
  assert code == 0, err
  assert "wrote d16 (VQVAE + VAR, scales" in stdout and str(out) in stdout
  assert [(r, f) for r, f, _ in fake_hub] == [
      ("FoundationVision/var", "vae_ch160v4096z32.pth"),
      ("FoundationVision/var", "var_d16.pth")]
  assert fake_hub[0][2] == {"cache_dir": str(tmp_path / "hf"),
                            "local_dir": str(tmp_path / "pth")}
  assert checkpoint.load_model(out)[0].var == get_preset("tiny").var
  # A second run keeps the directory unless told otherwise.
  code, _, err = run(capsys, "download", "--model", "d16", "--out", str(out),
                     "--preset", "tiny")
  assert code == 2 and "already exists; pass --overwrite" in err
  assert len(fake_hub) == 2  # Refused before any download.


def test_files_must_match_the_model_preset(golden_dir, tmp_path):
  fetch = lambda *a: (golden_dir / "vae_tiny.pth", golden_dir / "var_tiny.pth")
  with pytest.raises(ConvertError, match="preset disagrees.*vocab_size"):
    dl.download("d16", tmp_path / "m", fetch=fetch, log=lambda _: None)
  assert not (tmp_path / "m").exists()


def test_release_file_names():
  assert dl.checkpoint_files("d36") == ("vae_ch160v4096z32.pth",
                                        "var_d36.pth")
  with pytest.raises(dl.DownloadError, match="unknown model"):
    dl.checkpoint_files("d17")


def _http_client():
  """The HTTP client module behind huggingface_hub (httpx*, or requests)."""
  base = getattr(errors, "HTTPError", None)
  return importlib.import_module(base.__module__.split(".")[0] if base
                                 else "requests")


def _net_errors():
  """(name, exception, cause) as a dropped connection really raises them."""
  import requests
  client = _http_client()
  dns = OSError(-2, "Name or service not known")
  cases = [
      ("hub", errors.LocalEntryNotFoundError(
          "An error happened while trying to locate the file on the Hub"),
       client.ConnectError("[Errno -2] Name or service not known")
       if hasattr(client, "ConnectError") else dns),
      ("requests", requests.ConnectionError("Max retries exceeded"), dns),
      ("timeout", TimeoutError("timed out"), None),
  ]
  if hasattr(client, "ConnectTimeout"):
    cases.append(("client", client.ConnectTimeout("timed out"), None))
  return cases


@pytest.mark.parametrize("layer", ["hf_hub_download", "fetch_files"])
@pytest.mark.parametrize("case", _net_errors(), ids=lambda c: c[0])
def test_no_network_is_one_line_and_writes_nothing(monkeypatch, tmp_path,
                                                   capsys, caplog, layer, case):
  import huggingface_hub
  _, exc, cause = case

  def fail(*a, **k):
    # The hub warns on every retry before it gives up.
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s")
    raise exc from cause

  # Either the hub call inside fetch_files fails, or a whole other fetcher.
  monkeypatch.setattr(huggingface_hub if layer == "hf_hub_download" else dl,
                      layer, fail)
  out = tmp_path / "m"
  code, _, err = run(capsys, "download", "--model", "d16", "--out", str(out))
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert lines[0].startswith("var-jax download: error: cannot reach "
                             "huggingface.co to fetch FoundationVision/var")
  assert "not in the local cache" in lines[0]
  assert not out.exists()
  retries = [r for r in caplog.records if "Retrying" in r.getMessage()]
  assert len(retries) == (layer == "fetch_files")


def test_offline_mode_is_named(monkeypatch, tmp_path, capsys):
  # The real hf_hub_download under HF_HUB_OFFLINE: no network is touched.
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  out = tmp_path / "m"
  code, _, err = run(capsys, "download", "--model", "d20", "--out", str(out),
                     "--cache-dir", str(tmp_path / "empty-cache"))
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1, err
  assert lines[0].startswith("var-jax download: error: HF_HUB_OFFLINE is set "
                             "and FoundationVision/var/vae_ch160v4096z32.pth")
  assert not out.exists()


def test_other_fetch_failures_say_what_failed(monkeypatch, tmp_path, capsys):
  import huggingface_hub

  def fail(*a, **k):
    raise OSError(5, "Input/output error")

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
  code, _, err = run(capsys, "download", "--model", "d16", "--out",
                     str(tmp_path / "m"))
  assert code == 2 and err.count("\n") == 1
  assert ("fetching FoundationVision/var/vae_ch160v4096z32.pth failed: "
          "OSError: [Errno 5] Input/output error") in err


def test_full_disk_while_fetching_names_the_cache(monkeypatch, tmp_path,
                                                  capsys):
  import huggingface_hub

  def fail(*a, **k):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
  code, _, err = run(capsys, "download", "--model", "d16", "--out",
                     str(tmp_path / "m"), "--cache-dir", str(tmp_path / "hf"))
  assert code == 1 and err.count("\n") == 1
  assert (f"no space left on device writing {tmp_path / 'hf'} (fetching "
          "FoundationVision/var/vae_ch160v4096z32.pth") in err
  assert not (tmp_path / "m").exists()


def test_missing_package_says_how_to_install(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)
  code, _, err = run(capsys, "download", "--model", "d16", "--out",
                     str(tmp_path / "m"))
  assert code == 2 and err.count("\n") == 1
  assert "pip install huggingface_hub" in err
  assert not (tmp_path / "m").exists()


def test_checks_before_fetching(tmp_path, capsys, monkeypatch):
  def fetch(*a):
    raise AssertionError("fetched")

  monkeypatch.setattr(dl, "fetch_files", fetch)
  (tmp_path / "m").mkdir()
  code, _, err = run(capsys, "download", "--model", "d16", "--out",
                     str(tmp_path / "m"))
  assert code == 2 and "already exists" in err
  code, _, err = run(capsys, "download", "--model", "d16", "--out",
                     str(tmp_path / "n"), "--preset", "nope")
  assert code == 2 and "unknown preset 'nope'" in err
  code, _, err = run(capsys, "download", "--model", "d16", "--out",
                     str(tmp_path / "n"), "--pth-dir", str(tmp_path / "n"))
  assert code == 2 and "--pth-dir must differ from --out" in err
  assert not (tmp_path / "n").exists()


# --- Collaborative decoding pairs (OUT/drafter, OUT/refiner) -----------------

def _pair_fetch(golden_dir, calls):
  def fetch(drafter, refiner, steps, cache_dir, pth_dir):
    calls.append((drafter, refiner, steps, cache_dir, pth_dir))
    return (golden_dir / "vae_tiny.pth", golden_dir / "var_tiny.pth",
            golden_dir / "var_tiny_refiner.pth")
  return fetch


@pytest.mark.slow  # End to end: fetch, convert, sample.
def test_code_pair_converts_and_samples_like_the_reference(golden_dir, golden,
                                                           tmp_path):
  # The path a user takes: download the pair, load both directories, sample
  # with collaborative decoding; the tokens and images are the reference's.
  from test_sampler_golden import GREEDY, _nchw_to_nhwc, assert_tokens_equal

  from var_jax.sampling.var.code import check_same_tokenizer
  from var_jax.sampling.var.sampler import SampleOptions, Sampler
  calls, out = [], tmp_path / "pair"
  d_cfg, r_cfg = dl.download_pair(
      out, steps=6, cache_dir="C", presets=("tiny", None),
      fetch=_pair_fetch(golden_dir, calls), log=lambda _: None)
  assert calls == [("d30", "d16", 6, "C", None)]
  assert sorted(p.name for p in out.iterdir()) == ["drafter", "refiner"]
  assert d_cfg.var == get_preset("tiny").var
  assert (r_cfg.var.depth, r_cfg.var.embed_dim) == (1, 64)
  _, vae_d, drafter = checkpoint.load_model(out / "drafter")
  r_loaded, vae, refiner = checkpoint.load_model(out / "refiner")
  assert r_loaded == r_cfg
  check_same_tokenizer(vae_d, vae)
  g, labels = golden("code_tiny_io"), golden("var_tiny_io")["label"]
  opts = SampleOptions(cfg=1.5, draft_steps=6, **GREEDY)
  got = Sampler(vae, refiner, opts, drafter=drafter)(labels, seed=0)
  for si in range(10):
    assert_tokens_equal(got.idx[si], g[f"code_cfg1.5_N6_idx_{si}"],
                        name=f"idx_{si}")
  err = np.abs(np.asarray(got.images_BHWC)
               - _nchw_to_nhwc(g["code_cfg1.5_N6_img"])).max()
  assert err <= 1e-3, err


def test_pair_that_cannot_share_a_tokenizer_writes_nothing(golden_dir,
                                                           tmp_path):
  # A 512px refiner has another scale list: refused after reading, before
  # either directory is written.
  def fetch(*_):
    return (golden_dir / "vae_tiny.pth", golden_dir / "var_tiny.pth",
            golden_dir / "var_tiny_saln512.pth")

  with pytest.raises(IncompatibleModelsError, match=r"drafter and refiner "
                     r"differ in "
                     r"patch_nums: \(1, 2, 3, 4, 5, 6, 8, 10, 13, 16\) vs"):
    dl.download_pair(tmp_path / "pair", drafter="d30", refiner="d16",
                     presets=(None, None), fetch=fetch, log=lambda _: None)
  assert not (tmp_path / "pair").exists()


def test_code_release_file_names():
  assert dl.code_files(8) == ("drafter_8.pth", "refiner_8.pth")
  for n in (1, 5, 10):
    with pytest.raises(dl.DownloadError, match=f"--code 6, 7, 8, 9, not {n}"):
      dl.code_files(n)


@pytest.mark.parametrize("argv,files,steps", [
    (("--code", "6"), [("FoundationVision/var", dl.VAE_FILE),
                       ("Zigeng/VAR_CoDe", "drafter_6.pth"),
                       ("Zigeng/VAR_CoDe", "refiner_6.pth")], "6"),
    (("--model", "d30", "--refiner", "d20"),
     [("FoundationVision/var", dl.VAE_FILE),
      ("FoundationVision/var", "var_d30.pth"),
      ("FoundationVision/var", "var_d20.pth")], "N (1..9)"),
], ids=["code", "training-free"])
def test_cli_pair_through_fake_hub(fake_hub, tmp_path, capsys, argv, files,
                                   steps):
  out = tmp_path / "pair"
  code, stdout, err = run(capsys, "download", *argv, "--out", str(out),
                          "--preset", "tiny,")
  assert code == 0, err
  assert [(r, f) for r, f, _ in fake_hub] == files
  assert stdout.splitlines()[-1] == (
      f"wrote {out}/drafter and {out}/refiner; sample with var-jax sample "
      f"--ckpt {out}/refiner --drafter-ckpt {out}/drafter --draft-steps "
      f"{steps}")
  assert checkpoint.load_model(out / "drafter")[0].var == get_preset("tiny").var
  assert checkpoint.load_model(out / "refiner")[0].var.depth == 1
  # Existing directories are refused before anything is fetched.
  code, _, err = run(capsys, "download", *argv, "--out", str(out),
                     "--preset", "tiny,")
  assert code == 2 and f"{out}/drafter already exists" in err
  assert len(fake_hub) == 3


@pytest.mark.parametrize("argv,match", [
    (("--code", "5"), "CoDe publishes pairs for --code 6, 7, 8, 9, not 5"),
    (("--code", "6", "--refiner", "d20"), "--refiner goes with --model"),
    (("--code", "6", "--model", "d30"), "not allowed with argument"),
    (("--refiner", "d16"), "one of the arguments --model --infinity --code is "
     "required"),
    (("--code", "8", "--pth-dir", "OUT/drafter/pth"),
     "--pth-dir must differ from --out and lie outside it"),
])
def test_cli_pair_flags_are_checked_before_fetching(fake_hub, tmp_path,
                                                    capsys, argv, match):
  out = tmp_path / "pair"
  argv = [a.replace("OUT", str(out)) for a in argv]
  if "argument" in match:  # argparse's own refusal: exit 2, usage + line.
    with pytest.raises(SystemExit) as e:
      cli.main(["download", *argv, "--out", str(out)])
    assert e.value.code == 2 and match in capsys.readouterr().err
  else:
    code, _, err = run(capsys, "download", *argv, "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and match in err, err
  assert fake_hub == [] and not out.exists()
