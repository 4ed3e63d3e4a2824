"""Small helpers shared across seg2."""


class Seg2Error(RuntimeError):
    """A user-facing error: bad config, bad data or an unusable cache.

    Its message says what is wrong and where (file, config key). ``tools/train_net.py`` prints it
    without a traceback.
    """
