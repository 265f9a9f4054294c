"""The fixed 80/20 split rule of ImageNet-R / ImageNet-A / EuroSAT."""

import numpy as np
import pytest

from lorm_jax.data.holdout import holdout_key, holdout_split, num_test


def _data(seed=0, classes=20):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 60, classes)
  labels = np.repeat(np.arange(classes), sizes)
  keys = [f"n{c:08d}/img_{i}.jpg" for c, n in enumerate(sizes)
          for i in range(n)]
  return labels, keys


def test_disjoint_cover_and_per_class_share():
  labels, keys = _data()
  tr, te = holdout_split(labels, keys)
  assert np.intersect1d(tr, te).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])),
                                np.arange(labels.size))
  assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
  for c in np.unique(labels):
    n = int((labels == c).sum())
    assert int((labels[te] == c).sum()) == num_test(n)
    if n >= 2:
      assert (labels[tr] == c).any() and (labels[te] == c).any()
  assert num_test(10) == 2 and num_test(1) == 0 and num_test(2) == 1
  assert num_test(3) == 1 and num_test(100) == 20 and num_test(13) == 3


def test_deterministic_and_independent_of_record_order():
  labels, keys = _data()
  tr, te = holdout_split(labels, keys)
  tr2, te2 = holdout_split(labels, keys)
  np.testing.assert_array_equal(tr, tr2)
  np.testing.assert_array_equal(te, te2)
  perm = np.random.default_rng(5).permutation(labels.size)
  ptr, pte = holdout_split(labels[perm], [keys[i] for i in perm])
  assert {keys[perm[i]] for i in pte} == {keys[i] for i in te}
  assert {keys[perm[i]] for i in ptr} == {keys[i] for i in tr}


def test_other_seed_other_split_and_absolute_paths_same_split():
  labels, keys = _data()
  _, te = holdout_split(labels, keys)
  _, te_seed = holdout_split(labels, keys, seed=1)
  assert not np.array_equal(te, te_seed)
  # tfds imagenet_r 0.1.0 stored absolute paths: the key is the base name.
  abs_keys = ["/data/x/imagenet-r/" + k for k in keys]
  _, te_abs = holdout_split(labels, abs_keys)
  np.testing.assert_array_equal(te, te_abs)
  assert holdout_key(b"/a/b/c.jpg") == "c.jpg"


def test_pinned_values():
  # Pins the rule: a change here changes every ImageNet-R/A/EuroSAT split.
  labels = np.array([0] * 10 + [1] * 5)
  keys = [f"{i:02d}.jpg" for i in range(15)]
  tr, te = holdout_split(labels, keys)
  c0 = np.random.default_rng(np.random.SeedSequence([0, 0])).permutation(10)
  c1 = np.random.default_rng(np.random.SeedSequence([0, 1])).permutation(5)
  np.testing.assert_array_equal(te, np.sort(np.r_[c0[8:], 10 + c1[4:]]))


def test_no_keys_uses_record_index_and_validates():
  labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
  tr, te = holdout_split(labels)
  assert te.size == 2 and tr.size == 8
  with pytest.raises(ValueError, match="keys"):
    holdout_split(labels, ["a"])
  with pytest.raises(ValueError, match="test_fraction"):
    holdout_split(labels, test_fraction=1.0)
