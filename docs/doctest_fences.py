"""Griffe extension: show Keras-style docstring examples as code in the API pages.

Keras writes `Example:` followed by unindented `>>>` lines, which Markdown would
render as nested block quotes (and read `['kernel']` as a link). This wraps each
run of doctest lines, with their expected output, in a ```pycon fence, without
changing the docstrings themselves (they stay plain doctests).
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    out: list[str] = []
    in_doctest = False
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith(">>>") and not in_doctest:
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            in_doctest = True
        elif in_doctest and not stripped:
            out.append(f"{indent}```")
            in_doctest = False
        out.append(line)
    if in_doctest:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
