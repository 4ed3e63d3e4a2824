"""Checks across the processes of a distributed run."""

from detectron2.utils import comm

from . import Seg2Error


def check_same_in_all_processes(value, what: str, advice: str):
    """
    Gather ``value`` (a small picklable object) from every process and raise the same
    :class:`Seg2Error` in every process when they differ, naming each rank's value: a run whose
    processes disagree fails at once instead of waiting forever in a collective that some never
    join. Nothing happens in a single process.

    Args:
        what (str): what differs, for the message ("the task set", ...).
        advice (str): how to fix it.
    """
    if comm.get_world_size() == 1:
        return
    everyone = comm.all_gather(value)
    if any(v != everyone[0] for v in everyone):
        per_rank = "; ".join(f"rank {r}: {v}" for r, v in enumerate(everyone))
        raise Seg2Error(f"the training processes disagree on {what} ({per_rank}); {advice}")
