"""'did you mean ...?' for misspelled names: command-line flags, rewards, prompt sources, image loggers, choices."""

from __future__ import annotations

import difflib
import re
from typing import Iterable


def _normal(name: str) -> str:
    """``--Learning-Rate`` -> ``learning_rate``: case, leading dashes and ``-``/``_`` do not count."""
    return name.strip().lstrip("-").replace("-", "_").lower()


def _on_word_boundary(part: str, whole: str) -> bool:
    """Whether ``part`` occurs in ``whole`` as whole ``_``-separated words (``learning_rate`` in
    ``train_learning_rate``)."""
    return re.search(rf"(^|_){re.escape(part)}(_|$)", whole) is not None


def _spelling_neighbours(key: str, normal: dict[str, str], cutoff: float = 0.6, margin: float = 0.1) -> list[str]:
    """Names whose normal form is spelled like ``key`` (difflib ratio >= ``cutoff``), best first; only those within
    ``margin`` of the best, so a clear winner comes alone (``wirte`` -> ``write``, not also ``width``)."""
    scores = {}
    for name, value in normal.items():
        matcher = difflib.SequenceMatcher(None, key, value)
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff and matcher.ratio() >= cutoff:
            scores[name] = matcher.ratio()
    best = max(scores.values(), default=0.0)
    return sorted((n for n, score in scores.items() if score >= best - margin), key=lambda n: -scores[n])


def close_names(word: str, names: Iterable[str], limit: int = 3) -> list[str]:
    """The names ``word`` most likely meant, best first: the same name spelled with other case or separators, names
    that contain it as whole words, spelling neighbours (difflib), then names that merely contain it."""
    key = _normal(word)
    normal = {name: _normal(name) for name in names}
    if not key:
        return []
    same = [name for name, value in normal.items() if value == key]
    if same:
        return same[:limit]
    containing = sorted((name for name, value in normal.items() if len(key) >= 3 and key in value),
                        key=lambda name: len(normal[name]))
    words = [name for name in containing if _on_word_boundary(key, normal[name])]
    spelling = _spelling_neighbours(key, normal)
    ordered = list(dict.fromkeys(words + spelling + containing))
    return ordered[:limit]


def did_you_mean(word: str, names: Iterable[str], quote: str = "'") -> str:
    """``"did you mean 'x'?"`` / ``"did you mean 'x' or 'y'?"``, or ``""`` when nothing is close."""
    found = close_names(word, names)
    return f"did you mean {' or '.join(f'{quote}{n}{quote}' for n in found)}?" if found else ""
