"""Phase-2 cutouts: zero padding past the edges, the inverse paste, the network's input and the predict_fn contract."""
import numpy as np
import pytest

from spine_jax.inference.phase2 import common as phase2_common

from spine_jax.inference.phase2 import cutouts as cutout_lib

from spine_jax.inference.phase2 import oracle as oracle_lib

from spine_jax.inference.phase2 import consolidation
def test_cutout_inside_and_centre_at_half_size():
  volume = np.arange(10 * 12 * 14).reshape(10, 12, 14)
  cut = cutout_lib.cutout(volume, (5, 6, 7), (4, 5, 6))
  assert np.array_equal(cut, volume[3:7, 4:9, 4:10])
  assert cut[2, 2, 3] == volume[5, 6, 7]  # the centre voxel sits at size // 2


def test_cutout_past_every_edge_is_zero_padded_and_paste_inverts_it():
  volume = np.arange(1, 6 * 7 * 8 + 1).reshape(6, 7, 8)
  size = (8, 6, 10)
  for centre in [(0, 0, 0), (5, 6, 7), (2, 3, 4), (-3, 20, 4)]:
    cut = cutout_lib.cutout(volume, centre, size)
    assert cut.shape == size
    window = tuple(slice(max(c - s // 2, 0), max(min(c - s // 2 + s, n), 0))
                   for c, s, n in zip(centre, size, volume.shape))
    assert np.count_nonzero(cut) == volume[window].size  # the volume has no zeros: every zero is padding
    back = cutout_lib.paste(cut, centre, volume.shape)
    expected = np.zeros_like(volume)
    expected[window] = volume[window]
    assert np.array_equal(back, expected)
  assert not cutout_lib.cutout(volume, (40, 3, 3), (4, 4, 4)).any()  # wholly outside: all padding


def test_cutout_keeps_trailing_axes_and_fill_value():
  volume = np.ones((4, 4, 4, 3), np.float32)
  cut = cutout_lib.cutout(volume, (0, 0, 0), (4, 4, 4), fill=-1)
  assert cut.shape == (4, 4, 4, 3) and cut[0, 0, 0, 0] == -1 and cut[3, 3, 3, 2] == 1
  out = np.full((4, 4, 4, 3), 7.0, np.float32)
  cutout_lib.paste(np.zeros((2, 2, 2, 3), np.float32), (1, 1, 1), (4, 4, 4), out=out)
  assert out[0:2, 0:2, 0:2].sum() == 0 and out[2:].min() == 7


def test_relabel_and_one_hot_input():
  semantic = np.array([[[0, 26, 41, 42, 43, 44, 45, 46, 47, 48, 49, 60, 61, 62, 100]]], np.uint8)
  classes = cutout_lib.relabel_for_instance(semantic)
  assert classes.dtype == np.uint8
  assert classes.ravel().tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0]
  x = cutout_lib.instance_network_input(semantic)
  assert x.shape == semantic.shape + (10,) and x.dtype == np.float32
  assert np.array_equal(x.sum(-1), np.ones(semantic.shape)) and np.array_equal(x.argmax(-1), classes)
  assert cutout_lib.relabel_for_instance(np.zeros((2, 2, 2), np.int32)).max() == 0
  with pytest.raises(ValueError, match='negative'):
    cutout_lib.relabel_for_instance(np.full((1, 1, 1), -1))


class _Recorder:
  """A predict_fn marking fixed boxes of every cutout as above / centre / below, recording its inputs."""

  def __init__(self, output='scores'):
    self.batches, self.output = [], output

  def __call__(self, batch):
    self.batches.append(np.array(batch))
    classes = np.zeros(batch.shape[:4], np.int32)
    classes[:, 0:2, 0:2, 0:2] = phase2_common.ABOVE
    classes[:, 3:5, 3:5, 3:5] = phase2_common.CENTRE  # the cutout's centre voxel (4, 4, 4) and around
    classes[:, 6:8, 6:8, 6:8] = phase2_common.BELOW
    if self.output == 'classes':
      return classes
    return np.eye(4, dtype=np.float32)[classes] * 5.0 - 1.0  # logits


@pytest.mark.parametrize('output', ['scores', 'classes'])
def test_predict_cutouts_batches_and_volume_coordinates(output):
  semantic = np.zeros((10, 10, 10), np.uint8)
  semantic[4, 4, 4] = 49
  semantic[9, 9, 9] = 41
  recorder = _Recorder(output)
  centres = np.array([[4, 4, 4], [9, 9, 9], [0, 0, 0]])
  results = cutout_lib.predict_cutouts(recorder, semantic, centres, (8, 8, 8), batch_size=2)
  assert [b.shape for b in recorder.batches] == [(2, 8, 8, 8, 10)] * 2  # the last batch is padded to 2
  assert recorder.batches[0][0, 4, 4, 4].argmax() == 9 and recorder.batches[0][1, 4, 4, 4].argmax() == 1
  padding = recorder.batches[0][1, 7, 7, 7]  # beyond the volume: background
  assert padding.argmax() == 0 and padding.sum() == 1
  assert not recorder.batches[1][1].any()  # the batch filler is all zero
  above, centre, below = results[0]
  assert centre.box == (slice(3, 5),) * 3 and centre.mask.all()
  assert above.box == (slice(0, 2),) * 3 and below.box == (slice(6, 8),) * 3
  dense = centre.dense((10, 10, 10))
  assert dense.sum() == 8 and dense[3:5, 3:5, 3:5].all()
  assert results[1][0].box == (slice(5, 7),) * 3 and results[1][2] is None  # below lies past the edge
  assert results[2][0] is None and results[2][1].box == (slice(0, 1),) * 3  # cut at the low edge


def test_predict_cutouts_unpadded_batches_and_bad_outputs():
  semantic = np.zeros((6, 6, 6), np.uint8)
  recorder = _Recorder()
  cutout_lib.predict_cutouts(recorder, semantic, [[3, 3, 3]] * 3, (8, 8, 8), batch_size=2, pad_batches=False)
  assert [len(b) for b in recorder.batches] == [2, 1]
  assert cutout_lib.predict_cutouts(recorder, semantic, np.zeros((0, 3)), (8, 8, 8)) == []
  with pytest.raises(ValueError, match='predict_fn returned shape'):
    cutout_lib.predict_cutouts(lambda b: np.zeros(b.shape[:4] + (3,)), semantic, [[3, 3, 3]], (8, 8, 8))
  with pytest.raises(ValueError, match='predict_fn returned shape'):
    cutout_lib.predict_cutouts(lambda b: np.zeros(b.shape[:4], np.float32), semantic, [[3, 3, 3]], (8, 8, 8))
  with pytest.raises(ValueError, match='batch_size'):
    cutout_lib.predict_cutouts(recorder, semantic, [[3, 3, 3]], (8, 8, 8), batch_size=0)


def test_predict_cutouts_accepts_jax_outputs():
  jnp = pytest.importorskip('jax.numpy')
  semantic = np.zeros((6, 6, 6), np.uint8)
  semantic[2:4, 2:4, 2:4] = 49

  def fn(batch):  # body voxels (class 9) -> below, as JAX arrays
    body = jnp.asarray(batch)[..., 9]
    zero = jnp.zeros_like(body)
    return jnp.stack([1 - body, zero, zero, body], axis=-1)
  (result,) = cutout_lib.predict_cutouts(fn, semantic, [[3, 3, 3]], (8, 8, 8), batch_size=1)
  assert result[0] is None and result[1] is None
  assert np.array_equal(result[2].dense(semantic.shape), semantic == 49)


def test_cutout_dice_uses_only_the_overlap():
  a = cutout_lib.CutoutMask((slice(0, 4), slice(0, 4), slice(0, 4)), np.ones((4, 4, 4), bool))
  b = cutout_lib.CutoutMask((slice(2, 6), slice(0, 4), slice(0, 4)), np.ones((4, 4, 4), bool))
  c = cutout_lib.CutoutMask((slice(10, 12), slice(0, 4), slice(0, 4)), np.ones((2, 4, 4), bool))
  assert consolidation.cutout_dice(a, b) == 0.5 and consolidation.cutout_dice(a, c) == 0.0
  assert consolidation.cutout_dice(a, a) == 1.0


def test_oracle_answers_by_content_and_rejects_unknown_cutouts():
  semantic = np.zeros((8, 30, 8), np.uint8)
  reference = np.zeros(semantic.shape, np.int16)
  for k, vid in enumerate((20, 21, 22)):
    semantic[2:6, 2 + 10 * k:8 + 10 * k, 2:6] = 49
    reference[2:6, 2 + 10 * k:8 + 10 * k, 2:6] = vid
  centres = [[4, 15, 4], [4, 5, 4]]
  fn = oracle_lib.oracle_predict_fn(semantic, reference, centres, (8, 32, 8))
  batch = np.stack([cutout_lib.instance_network_input(cutout_lib.cutout(semantic, c, (8, 32, 8)))
                    for c in centres[::-1]])
  out = fn(np.concatenate([batch, np.zeros_like(batch[:1])]))
  assert out.shape == (3, 8, 32, 8) and not out[2].any()
  middle = cutout_lib.paste(out[1], centres[0], semantic.shape)
  assert np.array_equal(middle, np.select([reference == 20, reference == 21, reference == 22], [1, 2, 3]))
  top = cutout_lib.paste(out[0], centres[1], semantic.shape)
  assert np.array_equal(top, np.select([reference == 20, reference == 21], [2, 3]))
  with pytest.raises(KeyError, match='none of its centres'):
    fn(cutout_lib.instance_network_input(cutout_lib.cutout(semantic, (4, 25, 4), (8, 32, 8)))[None])
