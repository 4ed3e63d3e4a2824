"""Which outputs ("instances", "sem_seg", "panoptic_seg") a meta-architecture predicts, for
picking evaluators."""

# detectron2's own meta-architectures; seg2's add themselves where they are defined.
META_ARCH_TASKS = {
    "GeneralizedRCNN": frozenset({"instances"}),
    "ProposalNetwork": frozenset(),
    "SemanticSegmentor": frozenset({"sem_seg"}),
    # panoptic_seg only while MODEL.PANOPTIC_FPN.COMBINE.ENABLED (detectron2's default), see
    # model_tasks
    "PanopticFPN": frozenset({"instances", "sem_seg", "panoptic_seg"}),
}


def model_tasks(cfg) -> frozenset:
    """The outputs the model of ``cfg`` predicts; unknown meta-architectures are an error."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in META_ARCH_TASKS:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE={name!r}: seg2 does not know which outputs it predicts; add "
            "it "
            "to seg2.tasks.META_ARCH_TASKS"
        )
    tasks = META_ARCH_TASKS[name]
    if name == "PanopticFPN" and not cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED:
        tasks = tasks - {
            "panoptic_seg"
        }  # PanopticFPN.forward combines the outputs only when enabled
    if name == "Seg2MultiTaskRCNN" and cfg.MODEL.PANOPTIC_FPN.COMBINE.ENABLED:
        # The resolve step (seg2.resolve_config) turns it off for data that is not panoptic.
        tasks = tasks | {"panoptic_seg"}
    return tasks
