"""`var_jax.progress`: a live bar on a terminal, whole lines anywhere else."""

import io
import os
import pty
import re

from var_jax import progress


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def _plain(total, **kw):
  out, clock = io.StringIO(), Clock()
  bar = progress.PlainProgress(total, file=out, desc="train", unit="step",
                               clock=clock, **kw)
  return bar, out, clock


def test_file_gets_plain_lines_and_terminal_a_bar(tmp_path):
  with open(tmp_path / "log", "w") as f:
    assert isinstance(progress.progress_bar(10, file=f),
                      progress.PlainProgress)
  primary, secondary = pty.openpty()
  try:
    with os.fdopen(secondary, "w") as term:
      bar = progress.progress_bar(10, file=term)
      assert not isinstance(bar, progress.PlainProgress)
      bar.close()
  finally:
    os.close(primary)


def test_one_whole_line_per_tenth():
  bar, out, clock = _plain(200)
  for _ in range(200):
    clock.t += 0.01
    bar.update(1)
    bar.set_postfix(loss="1.2500", refresh=False)
  bar.close()  # Nothing new since the 100% line: no extra line.
  text = out.getvalue()
  assert "\r" not in text and text.endswith("\n")
  lines = text.splitlines()
  assert [int(re.match(r"train: \d+%\| (\d+)/200 step", l).group(1))
          for l in lines] == list(range(20, 201, 20)), lines
  assert lines[0] == ("train: 10%| 20/200 step, 100 step/s, 0:00 elapsed, "
                      "0:02 left, loss 1.2500")
  assert lines[-1].startswith("train: 100%| 200/200 step, ")


def test_slow_progress_reports_every_interval_and_at_close():
  bar, out, clock = _plain(1000, initial=500, every_s=30.0)
  clock.t = 29.0
  bar.update(1)
  assert out.getvalue() == ""
  clock.t = 31.0
  bar.update(1)  # 30 s since the start: one line, though < 10% moved.
  clock.t = 40.0
  bar.update(1)
  bar.close()  # The count moved since the last line: a closing line.
  bar.close()
  lines = out.getvalue().splitlines()
  assert [l.split(",")[0] for l in lines] == [
      "train: 50%| 502/1000 step", "train: 50%| 503/1000 step"], lines


def test_messages_and_disabled_reports():
  bar, out, clock = _plain(4)
  bar.update(2)
  bar.write("[train] a message")
  bar.close()
  assert out.getvalue().splitlines()[-1] == "[train] a message"
  quiet, out, clock = _plain(4, enabled=False)
  quiet.update(4)
  quiet.write("x")
  quiet.close()
  assert out.getvalue() == ""
