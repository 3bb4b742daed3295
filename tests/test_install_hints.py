"""Install commands printed or documented must work: var-jax is not on PyPI.

`pip install var-jax` and `pip install 'var-jax[EXTRA]'` fail for anyone
without a private index; from a checkout the commands are `pip install .`
and `pip install '.[EXTRA]'` (or the extra's own packages: `pip install
gcsfs`). Checked in the README, every docs page, the package, the tools and
the examples: printed hints and documented commands alike.
"""

import pathlib
import re

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_CHECKED = ["README.md", "docs", "var_jax", "tools", "examples"]
# `pip install var-jax`, `pip install 'var-jax[gcs]'`, `pip install -U var-jax`.
_FROM_PYPI = re.compile(r"pip install\s+(-\S+\s+)*['\"]?var-jax\b")


def _files():
  for name in _CHECKED:
    path = _ROOT / name
    if path.is_dir():
      yield from sorted(p for p in path.rglob("*")
                        if p.suffix in (".py", ".md", ".ipynb"))
    else:
      yield path


def test_no_install_from_pypi():
  found = [f"{p.relative_to(_ROOT)}:{i}: {line.strip()}"
           for p in _files()
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if _FROM_PYPI.search(line)]
  assert not found, "\n".join(found)


def test_readme_names_the_checkout_installs_and_accelerator_builds():
  text = (_ROOT / "README.md").read_text()
  install = text[text.index("## Install"):text.index("## Two commands")]
  for command in ("python -m pip install .", "pip install -U 'jax[cuda12]'",
                  "pip install -U 'jax[tpu]'", "pip install '.[EXTRA]'"):
    assert command in install, command
  # The two commands of the README stay as they are.
  assert "python -m pip install . && var-jax sample --out digits.png" in text
  assert ("python -m pip install -q -e '.[test,tpu]' && python -m pytest -q "
          "-m \"not slow\"") in text
