"""seg2's model parts, registered into detectron2's registries on import."""

from .tasks import META_ARCH_TASKS, model_tasks

__all__ = ["META_ARCH_TASKS", "model_tasks"]
