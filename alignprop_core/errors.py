"""The one exception type users see: a single line that names the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line error reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class AlignPropError(Exception):
    """Bad input or environment. The CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(AlignPropError):
    """A config value is missing, of the wrong type or out of range."""


class PluginError(AlignPropError):
    """A reward, image logger or prompt source is unknown, registered twice, or misbehaves."""
