"""Which topics of a ROS or MCAP log play which role, and gathering their messages into ``Streams``.

Shared by the MCAP and rosbag readers; messages are decoded by ``stages.formats.ros_messages``.

* Cameras: every topic that is a camera candidate by name or of an image type
  (``ros_messages.IMAGE_TYPES``), whatever it is called: the mapping's first candidate present
  first, then the others by name. A configured camera present in the log is the only one.
  None at all is ``missing_topic``.
* Other roles: the mapping's first candidate present, in the order of ``TOPIC_ROLES``; a topic
  plays one role.
* One ``Streams`` per camera, sharing the signals; ``meta`` says which camera
  (``topic.camera``, and ``camera_index`` from 0). Compressed frames stay compressed until
  curation reads them (``stages.frames``): only their headers are checked here; raw frames
  are views of the decoded messages. The names of a vector role's values come from
  the first message of its topic that names them (``ros_messages.signal_names``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.formats.ros_messages import (SCALAR_ROLES, TOPIC_ROLES, compressed_size, compressed_to_rgb,
                                         image_to_rgb, is_image_type, signal_names, signal_values, stamp_ns,
                                         task_text)
from stages.frames import Frames
from stages.streams import LogError, Mapping, Streams


@dataclass(frozen=True)
class Topics:
    """The picked topics: ``cameras`` (the first is the main one) and role -> topic for the rest."""

    cameras: tuple[str, ...]
    roles: dict[str, str]

    def role_of(self, topic: str) -> str | None:
        """"camera", a role of ``roles``, or None for a topic nobody picked."""
        if topic in self.cameras:
            return "camera"
        return next((role for role, t in self.roles.items() if t == topic), None)


def pick_topics(mapping: Mapping, available: dict[str, str], *, source: str) -> Topics:
    """The cameras and role topics among ``available`` (topic -> message type), by the rules above."""
    names = sorted(available)
    first = mapping.pick("camera", names)
    if first and mapping.configured("camera"):
        cameras = [first]
    else:
        found = {t for t in names if is_image_type(available[t]) or mapping.pick("camera", [t])}
        cameras = ([first] if first else []) + sorted(found - {first})
    if not cameras:
        types = {t: available[t] for t in names}
        raise LogError("missing_topic", f"{source}: no camera topic among {types} (candidates "
                                        f"{list(mapping.camera)}, or any topic of an image type)")
    free = [t for t in names if t not in cameras]
    roles: dict[str, str] = {}
    for role in TOPIC_ROLES[1:]:
        topic = mapping.pick(role, free)
        if topic is not None:
            roles[role] = topic
            free.remove(topic)
    return Topics(cameras=tuple(cameras), roles=roles)


class Collector:
    """Gathers the decoded messages of picked topics (``pick_topics``) into ``Streams``."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._frame_t: dict[str, list[np.ndarray]] = {c: [] for c in topics.cameras}  # chunks per camera
        # per camera: pieces of frames, each an array [n,H,W,3] or a list of (format, bytes, (H, W))
        self._frames: dict[str, list[np.ndarray | list]] = {c: [] for c in topics.cameras}
        self._signals: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}  # chunks, values [n,D]
        self._names: dict[str, tuple[str, ...]] = {}
        self._task: str | None = None

    def add_parsed(self, topic: str, stamp: int, payload: np.ndarray | tuple[str, bytes]) -> None:
        """Add a frame (camera topic: RGB, or a compressed image's (format, bytes)) or signal
        values (other topics: float32[D])."""
        if isinstance(payload, tuple):
            self._compressed(topic, stamp, *payload)
        else:
            self.add_batch(topic, np.asarray([stamp], np.int64), payload[None])

    def _compressed(self, topic: str, stamp: int, fmt: str, data: bytes) -> None:
        """A compressed frame, kept compressed: only its header is read (and checked) now."""
        size = compressed_size(fmt, data)
        self._frame_t[topic].append(np.asarray([stamp], np.int64))
        pieces = self._frames[topic]
        if not pieces or not isinstance(pieces[-1], list):
            pieces.append([])
        pieces[-1].append((fmt, data, size))

    def add_batch(self, topic: str, stamps: np.ndarray, payloads: np.ndarray) -> None:
        """Add frames [n,H,W,3] or signal values [n,D] with their stamps int64[n], in order."""
        role = self.topics.role_of(topic)
        if role == "camera":
            self._frame_t[topic].append(stamps)
            self._frames[topic].append(payloads)
        else:
            chunks, values = self._signals.setdefault(role, ([], []))
            chunks.append(stamps)
            values.append(payloads)

    def name(self, topic: str, msg: Any) -> None:
        """Take the names of a signal topic's values from a decoded message, if none yet."""
        role = self.topics.role_of(topic)
        if role not in (None, "camera", "task") and role not in self._names:
            names = signal_names(msg)
            if names:
                self._names[role] = names

    def add(self, topic: str, msg: Any, log_time: int) -> None:
        """Add one decoded message of a picked topic, by its role."""
        role = self.topics.role_of(topic)
        if role == "task":
            if self._task is None:
                self._task = task_text(msg)
        elif role == "camera" and not hasattr(msg, "encoding") and hasattr(msg, "format"):
            self._compressed(topic, stamp_ns(msg, log_time), str(msg.format), bytes(msg.data))
        elif role == "camera":
            self.add_parsed(topic, stamp_ns(msg, log_time), image_to_rgb(msg))
        else:
            self.name(topic, msg)
            self.add_parsed(topic, stamp_ns(msg, log_time), signal_values(msg))

    def _values(self, role: str, values: list[np.ndarray]) -> np.ndarray:
        widths = sorted({v.shape[1] for v in values})
        topic = self.topics.roles[role]
        if role in SCALAR_ROLES and widths != [1]:
            raise LogError("bad_message", f"{topic} ({role}) messages hold {widths} values, "
                                          "expected 1")
        if len(widths) > 1:
            raise LogError("bad_message", f"{topic} ({role}) messages hold {widths} values")
        stacked = np.concatenate(values).astype(np.float32, copy=False)
        return stacked[:, 0] if role in SCALAR_ROLES else stacked

    def streams(self, source_uri: str, meta: dict[str, str]) -> list[Streams]:
        """One ``Streams`` per camera with messages, ``topic.<role>`` added to ``meta`` for roles
        with data. Raises ``missing_topic`` when no camera has frames, ``bad_message`` when one
        camera's frame sizes differ."""
        cameras = [c for c in self.topics.cameras if self._frames[c]]
        if not cameras:
            raise LogError("missing_topic", f"{source_uri}: no messages on {list(self.topics.cameras)}")
        signals = {role: (np.concatenate(t).astype(np.int64, copy=False), self._values(role, v))
                   for role, (t, v) in self._signals.items()}
        used = [*signals] + (["task"] if self._task is not None else [])
        meta = {**meta, **{f"topic.{role}": self.topics.roles[role] for role in used}}
        out = []
        for index, camera in enumerate(cameras):
            pieces = self._frames[camera]
            shapes: set[tuple[int, int]] = set()
            for p in pieces:
                shapes |= {tuple(p.shape[1:3])} if isinstance(p, np.ndarray) else {item[2] for item in p}
            if len(shapes) > 1:
                raise LogError("bad_message", f"{camera} frames come in sizes {sorted(shapes)}")
            frames = Frames.concat([Frames.of(p) if isinstance(p, np.ndarray) else
                                    Frames.encoded(p, p[0][2], lambda item, size: compressed_to_rgb(item[0], item[1], size))
                                    for p in pieces])
            out.append(Streams(
                source_uri=source_uri, camera_t=np.concatenate(self._frame_t[camera]).astype(np.int64, copy=False),
                frames=frames, signals=signals, task=self._task or "",
                meta={**meta, "topic.camera": camera, "camera_index": str(index)}, names=dict(self._names)))
        return out
