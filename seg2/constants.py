"""The one home of seg2's constants that several layers share."""

# The value of a decoded label map that no loss or metric counts (void / unlabelled): every seg2
# dataset's metadata ``ignore_label``, the default of MODEL.SEM_SEG_HEAD.IGNORE_VALUE
# (detectron2's), and the default of every function that takes an ignore value.
IGNORE_LABEL = 255
