"""Helpers shared across seg2: the user-facing error here; timing and peak memory of benchmarks
in :mod:`seg2.utils.benchmark`."""


class Seg2Error(RuntimeError):
    """A user-facing error: bad config, bad data or an unusable cache.

    Its message says what is wrong and where (file, config key). ``tools/train_net.py`` prints it
    without a traceback.
    """
