"""Helpers shared across seg2: the user-facing errors here; the tools' entry point in
:mod:`seg2.utils.cli`."""


class Seg2Error(RuntimeError):
    """A user-facing error: bad config, bad data or an unusable cache.

    Its message says what is wrong and where (file, config key). The tools print it as the one
    line ``seg2: error: <message>`` and exit with status 1 (:func:`seg2.utils.cli.run_tool`).
    """


class UnreadableFileError(Seg2Error):
    """A data file (image or label map) that cannot be decoded: missing, empty, truncated, not an
    image. Training skips the sample and counts it (``SEG2.DATALOADER.MAX_BAD_SAMPLE_SHARE``);
    evaluation stops with it.

    Attributes:
        path (str): the file.
        reason (str): what went wrong, e.g. the decoder's message.
    """

    def __init__(self, path: str, what: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: cannot read the {what} ({reason})")
