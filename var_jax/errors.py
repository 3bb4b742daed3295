"""The one family of errors a user can cause.

Every error that bad input, a bad flag, a bad file or a missing resource can
raise derives from `VarJaxError`. The command line catches exactly this base
class and prints one line (`var-jax CMD: error: ...`, exit 2, or 1 for an I/O
fault); anything else is a bug and keeps its traceback. Library callers can
catch `VarJaxError`, or the builtin base a subclass also derives from
(`ValueError` for bad values, `OSError` for I/O faults).
"""

from __future__ import annotations


class VarJaxError(Exception):
  """Base class of every user-caused error in var-jax."""

  exit_code = 2


class UserError(VarJaxError, ValueError):
  """A bad flag, argument or value; the message names the value."""


class CheckpointError(VarJaxError, ValueError):
  """A model directory or training checkpoint that is missing, incomplete or
  does not match what it is used with."""


class IncompatibleModelsError(CheckpointError):
  """Models that cannot work together: a transformer and a tokenizer, or a
  drafter and a refiner, that differ in a field they must share (named,
  with both values)."""


class ConvertError(VarJaxError, ValueError):
  """Official weights whose keys or shapes do not match the name table."""


class PthError(VarJaxError, ValueError):
  """A `.pth` or `.safetensors` file that is not a readable tensor state
  dict."""


class DataError(VarJaxError, ValueError):
  """A data source that is missing, empty or inconsistent."""


class LpipsWeightsError(VarJaxError, ValueError):
  """LPIPS weights that are missing or do not fit the network."""


class InceptionWeightsError(VarJaxError, ValueError):
  """Inception weights that are missing or do not fit the network."""


class DownloadError(VarJaxError, RuntimeError):
  """A download that failed (no network, unknown model, hub error)."""


class VerifyError(VarJaxError, RuntimeError):
  """`var-jax verify` could not run, or found a disagreement."""


class TrainingDiverged(VarJaxError, RuntimeError):
  """A non-finite loss or gradient stopped a training run."""


class WriteError(VarJaxError, OSError):
  """Writing an output failed (full disk, no permission, I/O error).

  Nothing partial is left behind; the message names the path and the cause.
  """

  exit_code = 1
