"""Build-time checks of a config's norm against the channel counts it will normalise."""

from typing import Iterable

from detectron2.layers import get_norm

from ..utils import Seg2Error

__all__ = ["check_norm"]


def check_norm(norm: str, channels: Iterable[int], key: str, channels_key: str) -> None:
    """
    A :class:`Seg2Error` naming ``key`` (the norm's config key) and ``channels_key`` (where the
    channel counts come from) when detectron2's ``get_norm(norm, c)`` cannot normalise one of
    ``channels``: an unknown norm name, or "GN" (GroupNorm with 32 groups) on a count that 32
    does not divide. Without this check the error comes from inside torch when the layer is built
    and names no key.
    """
    if not norm:
        return
    for c in sorted(set(int(c) for c in channels)):
        try:
            get_norm(norm, c)  # builds one small module: the layer the model would get
        except KeyError as e:
            raise Seg2Error(
                f"{key}={norm!r} is not a norm detectron2's get_norm knows (e.g. 'BN', 'SyncBN', "
                f"'FrozenBN', 'GN', 'LN', or '' for none)"
            ) from e
        except ValueError as e:
            hint = (
                "GN is GroupNorm with 32 groups: every normalised channel count must be a "
                "multiple of 32"
                if norm == "GN"
                else str(e)
            )
            raise Seg2Error(
                f"{key}={norm!r} cannot normalise the {c} channels set by {channels_key}: {hint}. "
                f"Change {channels_key}, or choose another norm in {key} (e.g. 'BN' or 'SyncBN')"
            ) from e
