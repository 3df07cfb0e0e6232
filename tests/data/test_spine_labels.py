import numpy as np
import pytest

from spine_jax.data import spine_labels


def test_ids_round_trip_through_indices():
  ids = np.array(spine_labels.SEMANTIC_IDS, np.uint8).reshape(3, 5, 1)
  idx = spine_labels.ids_to_indices(ids)
  np.testing.assert_array_equal(idx.ravel(), np.arange(15))
  np.testing.assert_array_equal(spine_labels.indices_to_ids(idx), ids)


def test_unknown_ids_are_named():
  with pytest.raises(spine_labels.LabelError, match=r"sub-01_seg.nii.gz: labels \[7, 300\]"):
    spine_labels.ids_to_indices(np.array([0, 7, 49, 300]), name="sub-01_seg.nii.gz")


def test_left_right_swap_exchanges_the_pairs_only():
  lut = spine_labels.left_right_swap()
  ids = np.array(spine_labels.SEMANTIC_IDS)
  swapped = ids[lut]
  assert dict(zip(ids, swapped))[43] == 44 and dict(zip(ids, swapped))[48] == 47
  assert dict(zip(ids, swapped))[49] == 49
  np.testing.assert_array_equal(lut[lut], np.arange(15))


def test_split_endplates_are_endplates_with_names_of_their_own():
  """SPINEPS' outputs split endplates into 52 (superior) and 53 (inferior): valid on disk, endplate for a network."""
  ids = np.array([52, 53, 62, 0])
  spine_labels.check_ids(ids)
  assert spine_labels.ids_to_indices(ids).tolist() == [spine_labels.SEMANTIC_IDS.index(62)] * 3 + [0]
  assert [spine_labels.structure_name(i) for i in (52, 53)] == ["endplate_superior", "endplate_inferior"]
