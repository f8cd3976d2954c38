"""Quality signals: per-row flags over batches of whole spans, one verdict per span."""
from __future__ import annotations

import numpy as np
import pytest

from stages.quality import FLAGS, frame_signals, span_verdicts

MS = 1_000_000


def make_span(span_id: str, n: int = 20, *, seed: int = 0, period_ms: int = 50,
              size: int = 16) -> dict[str, np.ndarray]:
    """A clean span: textured mid-grey frames that change every step, in-range actions."""
    rng = np.random.default_rng(seed)
    return {
        "span_id": np.array([span_id] * n, dtype=object),
        "step": np.arange(n, dtype=np.int64),
        "timestamp_ns": np.arange(n, dtype=np.int64) * period_ms * MS,
        "image": rng.integers(40, 200, (n, size, size, 3), dtype=np.uint8),
        "action": np.column_stack([rng.uniform(-0.5, 0.5, n), np.full(n, 0.5),
                                   np.zeros(n)]).astype(np.float32),
        "state": rng.normal(size=(n, 8)).astype(np.float32),
    }


def batch_of(*spans: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([s[key] for s in spans]) for key in spans[0]}


def verdict_of(span: dict[str, np.ndarray]) -> dict:
    (verdict,) = span_verdicts(frame_signals(span))
    return verdict


def test_clean_span_is_kept_with_empty_flags():
    span = make_span("a")
    out = frame_signals(span)
    assert all(flags == [] for flags in out["flags"]) and out["flags"].dtype == object
    np.testing.assert_array_equal(out["image"], span["image"])  # the batch is passed through
    luma = span["image"][3].astype(np.float64) @ [0.299, 0.587, 0.114]
    assert out["luma"][3] == pytest.approx(luma.mean(), rel=1e-5)
    assert out["luma"].dtype == np.float32
    assert all(out[name].dtype == bool and not out[name].any() for name in FLAGS)
    verdict = span_verdicts(out)[0]
    assert verdict == {"span_id": "a", "frames": 20, "kept": True, "reasons": [], "detail": "",
                       "counts": {"frozen": 0, "dark": 0, "overexposed": 0, "dropped": 0}}


def nan_actions(span):
    span["action"][4:6, 1] = np.nan


def black(span):
    span["image"][:] = 0


def frozen_camera(span):
    span["image"][:] = span["image"][0]


def steer_out_of_range(span):
    span["action"][7, 0] = 1.5


def overexposed(span):
    span["image"][:12] = 250 + span["image"][:12] % 6  # bright but still changing


@pytest.mark.parametrize("break_it, reasons, row_flag", [
    (nan_actions, ["nonfinite_action"], "bad_action"),
    (black, ["frozen", "dark_or_overexposed"], "dark"),  # identical black frames are frozen too
    (frozen_camera, ["frozen"], "frozen"),
    (steer_out_of_range, ["action_range"], None),
    (overexposed, ["dark_or_overexposed"], "overexposed"),
])
def test_bad_spans_are_rejected_with_reason_codes(break_it, reasons, row_flag):
    span = make_span("b", seed=1)
    break_it(span)
    out = frame_signals(span)
    verdict = span_verdicts(out)[0]
    assert not verdict["kept"] and verdict["reasons"] == reasons
    assert verdict["detail"].startswith(reasons[0] + ":")
    if row_flag:
        assert any(row_flag in flags for flags in out["flags"])


def test_frozen_counts_and_first_row_is_never_frozen():
    span = make_span("c")
    span["image"][:] = span["image"][0]
    out = frame_signals(span)
    assert not out["frozen"][0] and out["frozen"][1:].all()
    assert span_verdicts(out)[0]["counts"]["frozen"] == 19
    # a tiny change (mean abs diff 1/768 per value) is still frozen; a real one is not
    span["image"][5, 0, 0, 0] ^= 1
    span["image"][9] = 255 - span["image"][9]
    out = frame_signals(span)
    assert out["frozen"][5] and not out["frozen"][9] and not out["frozen"][10]


def test_one_long_interval_keeps_the_span_but_flags_the_row_after_the_hole():
    span = make_span("d")
    span["timestamp_ns"][10:] += 100 * MS  # step 9 -> 10 takes 3x the period
    out = frame_signals(span)
    assert out["flags"][10] == ["dropped_before"]
    assert out["dropped_before"].sum() == 1
    verdict = span_verdicts(out)[0]
    assert verdict["kept"] and verdict["counts"]["dropped"] == 1
    span["timestamp_ns"][5:] += 100 * MS  # two holes in 20 rows: 10% <= 20%, still kept
    assert verdict_of(span)["kept"]
    too_many = span_verdicts(frame_signals(span), max_dropped_fraction=0.05)[0]
    assert too_many["reasons"] == ["dropped_frames"]


def test_several_spans_in_one_batch_are_separated():
    a, b, c = make_span("a", 10, seed=2), make_span("b", 8, seed=3), make_span("c", 6, seed=4,
                                                                                period_ms=100)
    b["image"][0] = a["image"][-1]  # b's first frame repeats a's last: not frozen across spans
    b["image"][1:] = b["image"][0]
    b["timestamp_ns"] += 10 * MS  # spans may share or restart stamps and steps
    out = frame_signals(batch_of(a, b, c))
    assert not out["frozen"][10] and out["frozen"][11:18].all() and not out["frozen"][:10].any()
    assert not out["dropped_before"].any()  # c's 100 ms steps are judged by c's own median
    verdicts = span_verdicts(out)
    assert [(v["span_id"], v["frames"], v["kept"]) for v in verdicts] == \
        [("a", 10, True), ("b", 8, False), ("c", 6, True)]
    assert verdicts[1]["reasons"] == ["frozen"] and verdicts[1]["counts"]["frozen"] == 7


def test_state_checks():
    span = make_span("e")
    span["state"][:3] = np.nan  # no state at all: fine
    out = frame_signals(span)
    assert not out["bad_state"].any() and span_verdicts(out)[0]["kept"]
    span["state"][5, 2] = np.nan
    span["state"][6, 0] = np.inf
    out = frame_signals(span)
    assert np.flatnonzero(out["bad_state"]).tolist() == [5, 6]
    assert span_verdicts(out)[0]["reasons"] == ["nonfinite_state"]
    clean = make_span("f")
    clean["state"][3, 1] = 50.0
    assert verdict_of(clean)["kept"]  # no state bounds given
    bounded = span_verdicts(frame_signals(clean), state_low=[-10] * 8, state_high=[10] * 8)[0]
    assert bounded["reasons"] == ["state_range"]


def test_spans_must_be_contiguous_and_in_step_order():
    a, b = make_span("a", 4), make_span("b", 4)
    with pytest.raises(ValueError, match="contiguous"):
        frame_signals(batch_of(a, b, make_span("a", 2)))
    a["step"][2] = 0
    with pytest.raises(ValueError, match="step order"):
        frame_signals(a)


def test_empty_batch():
    out = frame_signals({key: value[:0] for key, value in make_span("a").items()})
    assert len(out["flags"]) == 0 and len(out["luma"]) == 0
    assert span_verdicts(out) == []
