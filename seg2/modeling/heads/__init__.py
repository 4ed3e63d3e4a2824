"""seg2's semantic heads (registered in detectron2's ``SEM_SEG_HEADS_REGISTRY`` on import)."""

from .common import BaseSemSegHead
from .deeplab import Seg2DeepLabV3PlusHead
from .fcn import FCNHead
from .segnet import SegNetHead
from .unet import UNetHead

__all__ = ["BaseSemSegHead", "FCNHead", "UNetHead", "SegNetHead", "Seg2DeepLabV3PlusHead"]
