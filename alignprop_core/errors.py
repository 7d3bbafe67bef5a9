"""The one exception type users see: a single line that names the problem and the fix."""


class AlignPropError(Exception):
    """Bad input or environment. The CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(AlignPropError):
    """A config value is missing, of the wrong type or out of range."""


class PluginError(AlignPropError):
    """A reward, image logger or prompt source is unknown, registered twice, or misbehaves."""
