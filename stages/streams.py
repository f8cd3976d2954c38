"""The contract between log readers and curation: time-stamped streams, the mapping, errors.

A reader (``stages.formats``) turns one source unit (an MCAP file, a ROS bag, a LeRobot
dataset) into one ``Streams`` per recorded episode: camera frames with their stamps, and the
other signals (action, state, ...) each with its own stamps, at whatever rates they were
logged. ``stages.align`` then resamples the signals to the frame times and cuts the episode at
gaps. Readers never resample, resize or validate values; they only decode.

``Mapping`` says which topic (ROS/MCAP) or feature (LeRobot) plays which role. Each role lists
candidate names, tried in order; the first present in the log wins. Names may be fnmatch
patterns (``observation.images.*``). Defaults cover this project's own logs and common names.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from stages.frames import Frames

ROLES = ("action", "state", "expert_action", "reward", "intervention", "signals")


class LogError(ValueError):
    """A log (or part of one) that cannot be read; ``reason`` is a short code, ``detail`` text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Mapping:
    """Which topic or feature is the camera, the action, the state, the task text, ...

    Candidates are tried in order; the first name present in a log is used for that role.
    """

    camera: tuple[str, ...] = (
        "/camera/image_raw", "/camera/image_raw/compressed", "/camera/color/image_raw",
        "/camera/color/image_raw/compressed", "/camera/image", "/camera/image/compressed",
        "/image_raw", "/image_raw/compressed", "/image", "/camera",
        "observation.images.*", "observation.image")
    # exact names first, then the same names under any namespace (``/robot1/cmd_vel``)
    action: tuple[str, ...] = ("/vehicle/action", "/action", "/cmd", "/cmd_vel",
                               "/joint_commands", "action", "*/cmd_vel", "*/joint_commands",
                               "*/command", "*/cmd", "*/joint_trajectory")
    state: tuple[str, ...] = ("/vehicle/state", "/state", "/joint_states", "/odom",
                              "observation.state", "*/joint_states", "*/odom", "*/odometry", "*/state")
    expert_action: tuple[str, ...] = ("/expert/action", "expert_action")
    reward: tuple[str, ...] = ("/reward", "next.reward", "reward")
    intervention: tuple[str, ...] = ("/intervention", "intervention")
    signals: tuple[str, ...] = ("/signals", "signals")  # a world's boolean signals, in its spec's order
    task: tuple[str, ...] = ("/task", "task")

    def candidates(self, role: str) -> tuple[str, ...]:
        return getattr(self, role)

    def configured(self, role: str) -> bool:
        """Whether ``role`` has other candidates than the defaults (the user chose them)."""
        return self.candidates(role) != type(self).__dataclass_fields__[role].default

    def pick(self, role: str, available: Iterable[str]) -> str | None:
        """The first candidate of ``role`` matching one of ``available`` names (sorted), else None."""
        names = sorted(set(available))
        for pattern in self.candidates(role):
            hits = fnmatch.filter(names, pattern)
            if hits:
                return hits[0]
        return None

    @classmethod
    def from_dict(cls, values: dict | None) -> Mapping:
        """From a config dict; a string value is one candidate, unknown keys are an error."""
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown mapping roles {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**{k: (v,) if isinstance(v, str) else tuple(v) for k, v in values.items()})


@dataclass
class Streams:
    """What a reader decoded from one episode of one source, before alignment.

    ``frames`` are RGB uint8[N,H,W,3] in the order logged (``stages.frames.Frames``, decoded when
    read; an array is wrapped in one), ``camera_t`` their stamps (int64
    ns; the message header stamp where the format has one, else the log time). ``signals`` maps
    a role of ``ROLES`` to (stamps int64[M], values float32[M] or float32[M,D]); roles absent
    from the log are absent here. ``meta`` holds strings: ``format`` always, and where known
    ``world``, ``seed``, ``driver``, ``policy_version``, ``episode_index``, and the topic or
    feature used for each role (``topic.camera``, ``topic.action``, ...), and ``source`` (what
    wrote the log: a robot type, a writer library) where the format records one. ``names``
    gives the names of a vector role's values where the log has them (joint names, Twist axes,
    a multi-array's labels, a LeRobot feature's names).
    """

    source_uri: str
    camera_t: np.ndarray
    frames: Frames
    signals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    task: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.camera_t = np.asarray(self.camera_t, np.int64)
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            raise LogError("bad_image", f"frames are {self.frames.dtype}{list(self.frames.shape)}, "
                                        "expected uint8[N,H,W,3]")
        if not isinstance(self.frames, Frames):
            self.frames = Frames.of(self.frames)
        if len(self.camera_t) != len(self.frames):
            raise LogError("inconsistent_lengths",
                           f"{len(self.frames)} frames but {len(self.camera_t)} stamps")
        for role, (t, v) in self.signals.items():
            if role not in ROLES:
                raise ValueError(f"unknown signal role {role!r}; known: {ROLES}")
            if len(t) != len(v):
                raise LogError("inconsistent_lengths", f"{role}: {len(t)} stamps, {len(v)} values")
