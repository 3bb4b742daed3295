"""What identifies a run's training data, stored with its checkpoints.

A resume must see the same examples under the same labels: a class folder
added under a folder dataset shifts every later label, and an image added or
removed changes the data order of every later step. `identify(source)` says
what the data is (for a folder: its class list and image count; for a token
cache: its count, classes and a hash of its tokens and labels; TFDS: name,
split size and classes; digits: the split size); `differences(saved, now)`
names what changed, for one refusal line. The data path itself may change
(data moved to another disk), so it is not compared.
"""

from __future__ import annotations

import hashlib

import numpy as np


def identify(source) -> dict:
  """The identity of an opened `data.sources` source, as JSON values."""
  out = {"count": int(len(source)), "num_classes": int(source.num_classes)}
  classes = getattr(source, "classes", None)
  if classes is not None:  # Folder data.
    out["kind"] = "folder"
    out["classes"] = [str(c) for c in classes]
  elif getattr(source, "tokens_NL", None) is not None:
    out["kind"] = "tokens"
    h = hashlib.sha256()
    for a in (source.tokens_NL, source.labels):
      a = np.ascontiguousarray(a, np.int32)
      h.update(f"{a.shape}".encode())
      h.update(a.data)
    out["content"] = h.hexdigest()[:16]
  elif getattr(source, "name", None) is not None:  # TFDS.
    out["kind"] = "tfds"
    out["name"] = str(source.name)
  else:
    out["kind"] = type(source).__name__
  return out


def _names(xs) -> str:
  shown = ", ".join(repr(x) for x in xs[:5])
  return shown + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")


def differences(saved: dict, now: dict) -> list[str]:
  """What differs between two identities, in words ([] when the same).

  An identity missing from an older checkpoint (`saved` empty) is not
  compared.
  """
  if not saved:
    return []
  out = []
  if saved.get("kind") != now.get("kind"):
    out.append(f"data kind (checkpoint {saved.get('kind')}, now "
               f"{now.get('kind')})")
  a, b = saved.get("classes"), now.get("classes")
  if a is not None and b is not None and a != b:
    added = [c for c in b if c not in a]
    removed = [c for c in a if c not in b]
    if added:
      out.append(f"class folder(s) added: {_names(added)}")
    if removed:
      out.append(f"class folder(s) removed: {_names(removed)}")
    if not added and not removed:
      out.append("class folders renamed or reordered")
  elif saved.get("num_classes") != now.get("num_classes"):
    out.append(f"classes (checkpoint {saved.get('num_classes')}, now "
               f"{now.get('num_classes')})")
  if saved.get("count") != now.get("count"):
    out.append(f"examples (checkpoint {saved.get('count')}, now "
               f"{now.get('count')})")
  for key, what in (("name", "dataset"), ("content", "token cache content")):
    if saved.get(key) != now.get(key):
      out.append(f"{what} (checkpoint {saved.get(key)}, now {now.get(key)})")
  return out
