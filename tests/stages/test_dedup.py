"""Near-duplicate removal: nearest neighbours, greedy marking, groups, the lake bank, images."""
from __future__ import annotations

import numpy as np
import pytest

from stages.dedup import clip_embedding, mark_duplicates, nearest

RNG = np.random.default_rng(7)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_nearest_is_the_cosine_nearest_row():
    bank = RNG.normal(size=(50, 16)).astype(np.float32)
    queries = np.concatenate([bank[[3, 41]] * 5.0, RNG.normal(size=(4, 16))]).astype(np.float32)
    index, distance = nearest(queries, bank)
    expected = 1 - unit(queries.astype(np.float64)) @ unit(bank.astype(np.float64)).T
    assert index.dtype == np.int64 and distance.dtype == np.float32
    assert index.tolist() == expected.argmin(axis=1).tolist()
    np.testing.assert_allclose(distance, expected.min(axis=1), atol=1e-5)
    assert index[:2].tolist() == [3, 41] and distance[:2] == pytest.approx([0, 0], abs=1e-6)


def test_nearest_with_an_empty_bank_and_zero_rows():
    index, distance = nearest(np.ones((3, 4)), np.zeros((0, 4)))
    assert index.tolist() == [-1] * 3 and np.isinf(distance).all()
    _, distance = nearest(np.zeros((1, 4)), np.eye(4))
    assert distance.tolist() == [1.0]
    with pytest.raises(ValueError, match="non-finite"):
        nearest(np.full((1, 4), np.nan), np.eye(4))


def test_noisy_copies_are_duplicates_of_the_first_and_distinct_vectors_are_kept():
    base = unit(RNG.normal(size=(3, 64)))
    clips = np.stack([base[0], base[0] + 0.01 * RNG.normal(size=64), base[1],
                      base[0] + 0.01 * RNG.normal(size=64), base[2]])
    duplicate_of, novelty = mark_duplicates(clips, ids=list("abcde"), threshold=0.05)
    assert duplicate_of == ["", "a", "", "a", ""]
    assert np.isinf(novelty).all() and novelty.dtype == np.float32


def test_a_duplicate_is_never_kept_so_chains_point_to_kept_clips():
    # b is near a, c is near b but not near a: c is compared with kept clips only (a), so kept
    angles = np.radians([0.0, 14.0, 28.0])
    clips = np.column_stack([np.cos(angles), np.sin(angles)])
    threshold = 1 - np.cos(np.radians(20.0))
    assert mark_duplicates(clips, ids=["a", "b", "c"], threshold=threshold)[0] == ["", "a", ""]


def test_groups_keep_identical_clips_apart():
    vector = RNG.normal(size=8)
    clips = np.stack([vector, vector, vector, vector])
    duplicate_of, _ = mark_duplicates(clips, ids=list("abcd"), groups=["x", "y", "x", "y"],
                                      threshold=0.1)
    assert duplicate_of == ["", "", "a", "b"]


def test_existing_bank_counts_as_kept_and_novelty_is_the_distance_to_it():
    bank = unit(RNG.normal(size=(20, 32)))
    bank_groups = ["hard_brake"] * 10 + ["none"] * 10
    new = np.stack([bank[4] + 0.005 * RNG.normal(size=32),   # near a hard_brake lake clip
                    bank[4] + 0.005 * RNG.normal(size=32),   # same, but in group "none"
                    RNG.normal(size=32)])                      # novel
    duplicate_of, novelty = mark_duplicates(
        new, ids=["n0", "n1", "n2"], groups=["hard_brake", "none", "none"], threshold=0.02,
        existing=bank, existing_ids=[f"L{i}" for i in range(20)], existing_groups=bank_groups)
    assert duplicate_of == ["L4", "", ""]
    np.testing.assert_allclose(novelty, nearest(new, bank)[1], atol=1e-6)
    assert novelty[1] < 0.02 < novelty[2]  # novelty ignores groups


def test_threshold_is_strict_at_the_boundary():
    # cos = 0.5 exactly in float32: distance exactly 0.5, with or without a bank
    a, b = np.array([1.0, 0, 0, 0]), np.array([0.5, 0.5, 0.5, 0.5])
    assert mark_duplicates(np.stack([a, b]), ids=["a", "b"], threshold=0.5)[0] == ["", ""]
    above = float(np.nextafter(np.float32(0.5), np.float32(1)))
    assert mark_duplicates(np.stack([a, b]), ids=["a", "b"], threshold=above)[0] == ["", "a"]
    duplicate_of, novelty = mark_duplicates(b[None], ids=["b"], threshold=0.5, existing=a[None],
                                            existing_ids=["a"])
    assert duplicate_of == [""] and novelty.tolist() == [0.5]
    assert mark_duplicates(b[None], ids=["b"], threshold=above, existing=a[None],
                           existing_ids=["a"])[0] == ["a"]


def reference(embeddings, groups, threshold, existing, existing_groups):
    """The rule, written plainly: compare with every kept clip of the group, in float64."""
    vectors = unit(np.concatenate([existing, embeddings]).astype(np.float64))
    all_groups = list(existing_groups) + list(groups)
    kept, out = list(range(len(existing))), []
    for i in range(len(existing), len(vectors)):
        same = [k for k in kept if all_groups[k] == all_groups[i]]
        sims = vectors[same] @ vectors[i]
        if same and 1 - sims.max() < threshold:
            out.append(same[int(sims.argmax())])
        else:
            out.append(-1)
            kept.append(i)
    return out


def test_matches_the_plain_rule_across_blocks():
    # 700 new clips (several greedy blocks) drawn around 60 prototypes, 3 groups, a lake of 150
    protos = unit(RNG.normal(size=(60, 24)))

    def around(n):
        return protos[RNG.integers(0, 60, n)] + 0.03 * RNG.normal(size=(n, 24))
    new, lake = around(700), around(150)
    groups = RNG.choice(["a", "b", "c"], 700).tolist()
    lake_groups = RNG.choice(["a", "b", "c"], 150).tolist()
    ids = [f"lake{i}" for i in range(150)] + [f"new{i}" for i in range(700)]
    duplicate_of, _ = mark_duplicates(new, ids=ids[150:], groups=groups, threshold=0.02,
                                      existing=lake, existing_ids=ids[:150],
                                      existing_groups=lake_groups)
    expected = ["" if k < 0 else ids[k] for k in reference(new, groups, 0.02, lake, lake_groups)]
    assert duplicate_of == expected
    # all outcomes are well represented: kept, duplicate of the lake, duplicate of the batch
    outcomes = [d[:3] for d in duplicate_of]
    assert min(outcomes.count(""), outcomes.count("lak"), outcomes.count("new")) > 100


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="ids"):
        mark_duplicates(np.eye(3), ids=["a"], threshold=0.1)
    with pytest.raises(ValueError, match="together"):
        mark_duplicates(np.eye(3), ids=list("abc"), groups=list("xyz"), threshold=0.1,
                        existing=np.eye(3), existing_ids=list("def"))


def scene(seed: int, size: int = 64) -> np.ndarray:
    """An RGB image of a few random blocks on a gradient."""
    rng = np.random.default_rng(seed)
    image = np.tile(np.linspace(0, 120, size)[None, :, None], (size, 1, 3))
    for _ in range(6):
        y, x = rng.integers(0, size - 16, 2)
        image[y:y + 16, x:x + 16] = rng.integers(0, 256, 3)
    return image


def frame_feature(image: np.ndarray) -> np.ndarray:
    """Test-only feature: 8x8 block-mean grayscale, centred, unit norm."""
    gray = image.mean(axis=-1)
    small = gray.reshape(8, gray.shape[0] // 8, 8, gray.shape[1] // 8).mean(axis=(1, 3)).ravel()
    return unit(small - small.mean())


def clip_of(image: np.ndarray, seed: int, frames: int = 4) -> np.ndarray:
    """A clip of ``frames`` noisy captures of one scene, embedded."""
    rng = np.random.default_rng(seed)
    noisy = [np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
             for _ in range(frames)]
    return clip_embedding(np.stack([frame_feature(f) for f in noisy]))


def test_image_clips_copy_is_found_and_other_scene_is_not():
    first, copy, other = clip_of(scene(1), 10), clip_of(scene(1), 11), clip_of(scene(2), 12)
    assert first.dtype == np.float32 and np.linalg.norm(first) == pytest.approx(1, abs=1e-6)
    duplicate_of, _ = mark_duplicates(np.stack([first, copy, other]), ids=["first", "copy", "other"],
                                      threshold=0.05)
    assert duplicate_of == ["", "first", ""]
    _, distance = nearest(np.stack([copy, other]), first[None])
    assert distance[0] < 0.01 and distance[1] > 0.1


def test_clip_embedding_is_the_normalised_mean():
    frames = np.array([[3.0, 0.0], [3.0, 8.0]])
    np.testing.assert_allclose(clip_embedding(frames), [0.6, 0.8], atol=1e-7)
    assert clip_embedding(np.array([[1.0, -1.0], [-1.0, 1.0]])).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        clip_embedding(np.zeros((0, 4)))
