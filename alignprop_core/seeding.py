"""Seeds: every random draw of a run (prompt, noise, truncation K) is seeded from what identifies it, so any step or
evaluation sample can be reproduced alone, in any process, after any resume."""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Callable, Sequence

from alignprop_core.errors import AlignPropError


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (ints/strings), identical in every process and Python run."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def eval_seeds(seed: int, count: int) -> list[int]:
    """Per-sample seeds of the fixed evaluation set: ``derive_seed(eval_seed, "eval", i)``."""
    return [derive_seed(seed, "eval", i) for i in range(count)]


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed Python's and numpy's global RNGs (which TRL-style prompt functions use) and restore them after."""
    import numpy as np

    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def draw_prompts(prompt_fn: Callable[[], Any], seeds: Sequence[int]) -> tuple[list[str], list[dict]]:
    """One ``(prompt, metadata)`` per seed, each drawn with the global RNGs seeded by it (and restored after)."""
    pairs = []
    for seed in seeds:
        with seeded_global_rngs(seed):
            pairs.append(prompt_fn())
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], (dict, type(None)))):
            raise AlignPropError(f"the prompt source returned {pair!r}; it must return (prompt: str, metadata: dict)")
    return [p for p, _ in pairs], [dict(m or {}) for _, m in pairs]
