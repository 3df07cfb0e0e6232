"""Entry point for metrics between masks.

  python -m spine_jax.evaluate seg --pred=pred_seg-spine_msk.nii.gz --ref=ref.nii.gz [--output=report.json]

  python -m spine_jax.evaluate instances --pred=pred_seg-vert_msk.nii.gz --ref=ref.nii.gz [--output=report.json|.csv]

`seg`: per-structure Dice and average symmetric surface distance (mm) between two masks on one grid.
`instances`: per-vertebra (disc, endplate) Dice and ASSD paired by id and by overlap, detection
precision / recall / F1 and panoptic quality of two instance masks with SPINEPS ids.
"""
import sys

from spine_jax.metrics import instances
from spine_jax.metrics import segmentation

COMMANDS = {"seg": segmentation.main, "instances": instances.main}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in COMMANDS:
    print(f"usage: python -m spine_jax.evaluate {{{'|'.join(COMMANDS)}}} [flags]", file=sys.stderr)
    return 2
  return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main())
