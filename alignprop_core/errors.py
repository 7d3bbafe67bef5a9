"""The one exception type users see: a single line that names the problem and the fix."""

import pickle


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line error reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def error_text(exc: BaseException, limit: int = 160) -> str:
    """``"ExcType: first line of the message"``, cut to ``limit`` characters, for "could not load ..." messages."""
    text = first_line(exc)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def weights_only_error(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in a few words: torch's own message for a pickle of Python
    objects is a paragraph that suggests ``weights_only=False``, which alignprop never does."""
    return "not a torch.save file of tensors only" if isinstance(exc, pickle.UnpicklingError) else error_text(exc)


class AlignPropError(Exception):
    """Bad input or environment. The CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(AlignPropError):
    """A config value is missing, of the wrong type or out of range."""


class PluginError(AlignPropError):
    """A reward, image logger or prompt source is unknown, registered twice, or misbehaves."""
