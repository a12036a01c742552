"""Label values shared by data preparation, training, inference and severity scoring.

Label maps on disk are single-channel 8-bit images:

* ``0`` background (outside the lung fields)
* ``1`` lung field without opacity (clear lung)
* ``2`` lung field with opacity (haziness, ground glass, consolidation)
* ``3`` lung field whose opacity was not annotated (lung-only masks): trains the lung output only

The network predicts the first three as softmax classes; ``3`` never comes out of the network.
"""

BACKGROUND = 0
CLEAR_LUNG = 1
OPACITY = 2
LUNG_UNANNOTATED = 3

NUM_CLASSES = 3
CLASS_NAMES = {BACKGROUND: "background", CLEAR_LUNG: "lung", OPACITY: "opacity"}
