"""Helpers shared across seg2: the user-facing errors here; the tools' entry point in
:mod:`seg2.utils.cli`."""

import contextlib
import functools
from typing import Dict


class Seg2Error(RuntimeError):
    """A user-facing error: bad config, bad data or an unusable cache.

    Its message says what is wrong and where (file, config key). The tools print it as the one
    line ``seg2: error: <message>`` and exit with status 1 (:func:`seg2.utils.cli.run_tool`).
    """


class UnreadableFileError(Seg2Error):
    """A data file (image or label map) that cannot be decoded: missing, empty, truncated, not an
    image. Training skips the sample and counts it (``DATALOADER.MAX_BAD_SAMPLE_SHARE``);
    evaluation stops with it.

    Attributes:
        path (str): the file.
        reason (str): what went wrong, e.g. the decoder's message.
    """

    def __init__(self, path: str, what: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: cannot read the {what} ({reason})")


class InvalidArgument(Seg2Error, ValueError):
    """A constructor argument outside its range, named by the constructor that checks it (each
    rule is checked once, where the argument is used). Built from a config, the same error names
    the config key instead (:func:`config_keys`).

    Attributes:
        arg (str): the argument's name.
        value: the value given.
        expected (str): what it must be.
    """

    def __init__(self, arg: str, value, expected: str):
        self.arg, self.value, self.expected = arg, value, expected
        super().__init__(f"{arg}={value!r}: expected {expected}")


@contextlib.contextmanager
def config_keys(keys: Dict[str, str]):
    """
    Within it, an :class:`InvalidArgument` for an argument in ``keys`` (argument name -> config
    key) becomes a :class:`Seg2Error` naming the config key: the one wrapper between a
    constructor's own checks and the config it was built from::

        with config_keys({"tile_size": "TEST.TILING.TILE_SIZE"}):
            spec = TilingSpec(tile_size=cfg.TEST.TILING.TILE_SIZE, ...)
    """
    try:
        yield
    except InvalidArgument as e:
        if e.arg not in keys:
            raise
        raise Seg2Error(f"{keys[e.arg]}={e.value!r}: expected {e.expected}") from None


def name_config_keys(keys: Dict[str, str]):
    """
    Decorator of a ``@configurable`` ``__init__`` (placed above ``@configurable``): built from a
    config (its first argument a CfgNode), an :class:`InvalidArgument` of an argument in ``keys``
    names the config key (:func:`config_keys`); built from arguments, it names the argument.
    """

    def decorator(init):
        @functools.wraps(init)
        def wrapped(self, *args, **kwargs):
            from fvcore.common.config import CfgNode

            if (args and isinstance(args[0], CfgNode)) or isinstance(kwargs.get("cfg"), CfgNode):
                with config_keys(keys):
                    return init(self, *args, **kwargs)
            return init(self, *args, **kwargs)

        return wrapped

    return decorator
