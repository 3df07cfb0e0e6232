"""SPINEPS phase 3 (labelling): the labelling network's per-vertebra softmaxes become one level per vertebra."""
