"""SPINEPS phase 2 (SPEC section 3, "Phase 2, instance") on PIR model-space arrays.

The semantic mask says what each voxel is (body, arch, disc ...) but not which vertebra it
belongs to. Phase 2 separates the vertebrae:

1. `centres.vertebral_body_centres`: one centre per vertebral body (label 49), bottom to top, with
   fused bodies split and body fragments at one height merged.
2. `cutouts.predict_cutouts`: a fixed-size block of the relabelled semantic mask around each centre goes
   through the instance network, which marks the vertebra above, the one at the centre and the
   one below. Each vertebra is so seen by up to three cutouts.
3. `consolidation.consolidate`: those overlapping views are paired by Dice into "couples" and merged by voting
   into one instance map (SPEC's rules, as SPINEPS' `create_prediction_couples` and
   `merge_coupled_predictions`).
4. `labelling.label_spine`: the joint post-processing of instances and semantics: vertebra voxels follow
   the semantic mask exactly, vertebrae are numbered top to bottom, the sacrum is 26, disc
   below vertebra X is 100 + X, endplates 200 + X.

`pipeline.segment_instances` runs all four; `pipeline.centroids` summarises the result for
`*_seg-spine_ctd.json`; `oracle.oracle_predict_fn` stands in for the network from a reference
instance map (tests, and the ceiling of what the network can reach).
Axis 1 (I) points inferior, so a larger axis-1 index is lower in the body. Size and distance
thresholds are voxel counts at the reference spacing (0.75 x 0.75 x 1.65 mm), scaled to the
actual spacing; erosions are in voxels. Functions that can meet a degenerate spine return
`(result, messages)`: each message is also logged as a warning, so callers can show and store them.

Two modes (`inference.phase2_mode`). 'spineps', the mode of models converted from SPINEPS, follows
SPINEPS 2.1.3 rule for rule (`spineps_centres.py`, `spineps_instances.py`; equal to SPINEPS' own
`predict_instance_mask` with the same network, tests/inference/test_phase2_vs_spineps.py), except
that an empty couple is skipped instead of ending the whole run (`abort_on_empty_couple` restores
that). 'spine_jax', the mode of models trained here, differs: a fused body is cut by nearest seed
after erosion rather than by a fitted plane; body pieces at one height are merged into one centre;
uncovered vertebra voxels are grouped over all vertebra labels at once, not label by label; and
there is no labelling network, so numbering is positional (`labelling.label_spine`). Shared
settings and helpers are `common.py`.
"""
