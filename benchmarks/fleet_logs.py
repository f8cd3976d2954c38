"""Fleet logs of realistic shape for the curation benchmark, written the way robots write them.

Nothing here is worldloop's own log format: the logs are foreign, so curation meets them as it
would meet a customer's fleet.

* ROS 2 MCAP (``write_mcap``), written with mcap-ros2-support's ``mcap_ros2.writer.Writer``
  (its defaults: zstd chunks of 1 MiB): ``/front_cam/image/compressed``
  (``sensor_msgs/msg/CompressedImage``, JPEG 640x480 at quality 85, 30 Hz, header stamps the
  capture time, log time 2-5 ms later), ``/arm/joint_states`` (``sensor_msgs/msg/JointState``,
  7 named joints with position, velocity and effort, 100 Hz) and ``/arm/joint_commands``
  (``std_msgs/msg/Float64MultiArray``, 7 wide, 100 Hz), interleaved in log-time order.
* LeRobot v3.0 (``write_lerobot``): ``meta/info.json``, ``meta/episodes/chunk-000/file-000.parquet``,
  ``meta/tasks.parquet``, ``data/chunk-000/file-000.parquet`` (``observation.state`` and
  ``action``, 6 named joints of an SO-100-like arm, fixed-size float32 lists) and
  ``videos/observation.images.wrist/chunk-000/file-000.mp4``: AV1 (libsvtav1, yuv420p, crf 30,
  g 2 as LeRobot records; preset 12) at 256x256, 30 fps, all episodes of a set in one file.

Frames (``scene_frames``) are moving sine gradients over a smooth texture, with moving
rectangles and discs and Gaussian noise, so JPEG sizes are realistic (about 50 KB at 640x480).
A pool of distinct frames is rendered and encoded once and cycled, each log from its own
offset: the benchmark times curation, not generation. Every log has its own start time,
trajectory and pool offset, so no two logs hold the same bytes.
``car_episode`` is different: a synthetic episode of worldloop's own car world, for the
benchmark's warm-up curate (which trains the scene reasoner a lake needs once).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mcap_ros2.writer import Writer
from PIL import Image
from rosbags.typesys import Stores, get_typestore

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encoder otherwise

CAMERA_TOPIC, JOINT_STATES_TOPIC, COMMANDS_TOPIC = ("/front_cam/image/compressed", "/arm/joint_states",
                                                    "/arm/joint_commands")
ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow", "wrist_1", "wrist_2", "wrist_3", "gripper")
CAMERA_HZ, JOINT_HZ = 30, 100
LEROBOT_CAMERA = "observation.images.wrist"
LEROBOT_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
LEROBOT_FPS = 30
START_NS = 1_735_000_000_000_000_000  # a recent wall clock, as ROS stamps are
ROS2 = get_typestore(Stores.ROS2_HUMBLE)  # the message definitions the MCAP's schemas carry


def scene_frames(count: int, height: int, width: int, *, seed: int) -> np.ndarray:
    """``count`` uint8 [H, W, 3] frames of a moving scene: a drifting sine gradient over a smooth
    texture, 8 rectangles and discs moving across it, Gaussian noise (sigma 5)."""
    rng = np.random.default_rng(seed)
    yy, xx = (a.astype(np.float32) for a in np.mgrid[0:height, 0:width])
    yy, xx = yy / height, xx / width
    angle, cycles = rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 4.0)
    wave = (2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    base, amplitude = rng.uniform(70, 150, 3).astype(np.float32), rng.uniform(40, 80, 3).astype(np.float32)
    coarse = rng.normal(0, 1, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
    texture = 18 * np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))[..., None]
    shapes = [(rng.uniform(0.1, 0.9, 2), rng.uniform(-0.01, 0.01, 2), rng.uniform(0.04, 0.15),
               rng.uniform(0, 255, 3).astype(np.float32), bool(rng.integers(2))) for _ in range(8)]
    out = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        image = base + amplitude * np.sin(wave + 0.15 * i + phase) + texture
        for centre, velocity, radius, colour, disc in shapes:
            cy, cx = (centre + velocity * i) % 1.0
            if disc:
                mask = (yy - cy) ** 2 + ((xx - cx) * width / height) ** 2 < radius ** 2
            else:
                mask = (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < 1.5 * radius * height / width)
            image[mask] = colour
        image += rng.normal(0, 5, image.shape).astype(np.float32)
        out[i] = np.clip(image, 0, 255)
    return out


def jpeg_pool(frames: np.ndarray, quality: int = 85) -> list[bytes]:
    """Each frame as JPEG bytes (Pillow, ``quality``)."""
    out = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def joint_trajectory(t_s: np.ndarray, joints: int, *, seed: int) -> np.ndarray:
    """float64 [len(t_s), joints] smooth joint positions (radians; the last joint a gripper in [0, 1])."""
    rng = np.random.default_rng(seed)
    period = rng.uniform(2.0, 8.0, joints)
    centre, swing = rng.uniform(-0.8, 0.8, joints), rng.uniform(0.1, 0.6, joints)
    q = centre + swing * np.sin(2 * np.pi * t_s[:, None] / period + rng.uniform(0, 2 * np.pi, joints))
    q[:, -1] = 0.5 + 0.5 * np.sin(2 * np.pi * t_s / period[-1])
    return q


def write_mcap(path: str, *, seconds: float, jpegs: list[bytes], seed: int) -> int:
    """A ROS 2 MCAP log of ``seconds`` at ``path`` (topics in the module doc); its camera frames."""
    rng = np.random.default_rng(seed)
    start = START_NS + seed * 3_600 * 10**9
    frames, samples = int(seconds * CAMERA_HZ), int(seconds * JOINT_HZ)
    camera_t = start + np.round(np.arange(frames) * 1e9 / CAMERA_HZ).astype(np.int64) \
        + rng.integers(-500_000, 500_000, frames)  # +-0.5 ms capture jitter
    joint_t = start + np.arange(samples, dtype=np.int64) * (10**9 // JOINT_HZ)
    q = joint_trajectory((joint_t - start) / 1e9, len(ARM_JOINTS), seed=seed)
    velocity = np.gradient(q, 1.0 / JOINT_HZ, axis=0)
    command = joint_trajectory((joint_t - start) / 1e9 + 0.05, len(ARM_JOINTS), seed=seed)  # leads by 50 ms
    offset = (seed * 17) % len(jpegs)
    events = sorted([(int(t) + int(rng.integers(2_000_000, 5_000_000)), 0, i) for i, t in enumerate(camera_t)]
                    + [(int(t) + 300_000, 1, i) for i, t in enumerate(joint_t)]
                    + [(int(t) + 600_000, 2, i) for i, t in enumerate(joint_t)])
    layout = {"dim": [{"label": "joints", "size": len(ARM_JOINTS), "stride": len(ARM_JOINTS)}], "data_offset": 0}
    with open(path, "wb") as stream:
        writer = Writer(stream)
        image_s, state_s, command_s = (writer.register_msgdef(name, ROS2.generate_msgdef(name, ros_version=2)[0])
                                       for name in ("sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/JointState",
                                                    "std_msgs/msg/Float64MultiArray"))
        for log_time, kind, i in events:
            if kind == 0:
                sec, nanosec = divmod(int(camera_t[i]), 10**9)
                writer.write_message(CAMERA_TOPIC, image_s, {
                    "header": {"stamp": {"sec": sec, "nanosec": nanosec}, "frame_id": "front_cam_optical"},
                    "format": "jpeg", "data": jpegs[(offset + i) % len(jpegs)]}, log_time=log_time, sequence=i)
            elif kind == 1:
                sec, nanosec = divmod(int(joint_t[i]), 10**9)
                writer.write_message(JOINT_STATES_TOPIC, state_s, {
                    "header": {"stamp": {"sec": sec, "nanosec": nanosec}, "frame_id": "base_link"},
                    "name": list(ARM_JOINTS), "position": q[i].tolist(), "velocity": velocity[i].tolist(),
                    "effort": (2.0 * q[i]).tolist()}, log_time=log_time, sequence=i)
            else:
                writer.write_message(COMMANDS_TOPIC, command_s, {"layout": layout, "data": command[i].tolist()},
                                     log_time=log_time, sequence=i)
        writer.finish()
    return frames


def _encode_av1(frames: list[np.ndarray], path: str, *, fps: int) -> None:
    """An mp4 of RGB ``frames`` with frame i at pts i / fps (the settings in the module doc)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libsvtav1", rate=fps, options={"crf": "30", "g": "2", "preset": "12"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_lerobot(root: str, *, episodes: int, seconds: float, pool: np.ndarray, seed: int) -> int:
    """A LeRobot v3.0 dataset of ``episodes`` episodes of ``seconds`` at ``root`` (layout in the
    module doc), frames cycled from ``pool`` (uint8 [P, 256, 256, 3]); its frames."""
    n = int(seconds * LEROBOT_FPS)
    width, task = len(LEROBOT_JOINTS), "pick up the cube and place it in the bin"
    video_rel = f"videos/{LEROBOT_CAMERA}/chunk-000/file-000.mp4"
    rows, meta, frames = [], [], []
    for e in range(episodes):
        t = np.arange(n) / LEROBOT_FPS
        state = joint_trajectory(t, width, seed=seed * 1000 + e).astype(np.float32)
        action = joint_trajectory(t + 1 / LEROBOT_FPS, width, seed=seed * 1000 + e).astype(np.float32)
        offset = (seed * 31 + e * 7) % len(pool)
        frames += [pool[(offset + i) % len(pool)] for i in range(n)]
        rows.append(pa.table({
            "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), width),
            "action": pa.FixedSizeListArray.from_arrays(pa.array(action.ravel()), width),
            "timestamp": pa.array(t.astype(np.float32)), "frame_index": pa.array(np.arange(n)),
            "episode_index": pa.array(np.full(n, e)), "index": pa.array(np.arange(e * n, (e + 1) * n)),
            "task_index": pa.array(np.zeros(n, np.int64))}))
        meta.append({"episode_index": e, "tasks": [task], "length": n, "data/chunk_index": 0,
                     "data/file_index": 0, "dataset_from_index": e * n, "dataset_to_index": (e + 1) * n,
                     f"videos/{LEROBOT_CAMERA}/chunk_index": 0, f"videos/{LEROBOT_CAMERA}/file_index": 0,
                     f"videos/{LEROBOT_CAMERA}/from_timestamp": e * n / LEROBOT_FPS,
                     f"videos/{LEROBOT_CAMERA}/to_timestamp": (e + 1) * n / LEROBOT_FPS,
                     "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
    for rel in ("data/chunk-000", "meta/episodes/chunk-000"):
        os.makedirs(os.path.join(root, rel), exist_ok=True)
    pq.write_table(pa.concat_tables(rows), os.path.join(root, "data/chunk-000/file-000.parquet"))
    pq.write_table(pa.Table.from_pylist(meta), os.path.join(root, "meta/episodes/chunk-000/file-000.parquet"))
    pq.write_table(pa.table({"task_index": [0], "task": [task]}), os.path.join(root, "meta/tasks.parquet"))
    _encode_av1(frames, os.path.join(root, video_rel), fps=LEROBOT_FPS)
    height, width_px = pool.shape[1:3]
    vector = {"dtype": "float32", "shape": [width], "names": list(LEROBOT_JOINTS)}
    info = {
        "codebase_version": "v3.0", "robot_type": "so100_follower", "fps": LEROBOT_FPS,
        "total_episodes": episodes, "total_frames": episodes * n, "total_tasks": 1, "chunks_size": 1000,
        "data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "splits": {"train": f"0:{episodes}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {
            LEROBOT_CAMERA: {"dtype": "video", "shape": [height, width_px, 3], "names": ["height", "width", "channels"],
                             "info": {"video.fps": LEROBOT_FPS, "video.height": height, "video.width": width_px,
                                      "video.codec": "av1", "video.pix_fmt": "yuv420p",
                                      "video.is_depth_map": False, "has_audio": False}},
            "observation.state": vector, "action": vector,
            **{k: {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
               for k in ("timestamp", "frame_index", "episode_index", "index", "task_index")}}}
    with open(os.path.join(root, "meta/info.json"), "w") as f:
        json.dump(info, f, indent=4)
    return episodes * n


@dataclass
class Fleet:
    """What ``write_fleet`` wrote: paths by format, and frames per path."""

    mcap: list[str] = field(default_factory=list)
    lerobot: list[str] = field(default_factory=list)
    frames: dict[str, int] = field(default_factory=dict)

    def count(self, paths: list[str]) -> int:
        return sum(self.frames[p] for p in paths)


class FramePools:
    """The encoded JPEG pool (640x480) and the 256x256 frame pool, rendered once per process."""

    def __init__(self, *, size: int = 60, seed: int = 0) -> None:
        self.jpegs = jpeg_pool(scene_frames(size, 480, 640, seed=seed))
        self.video = scene_frames(size, 256, 256, seed=seed + 1)


def write_fleet(landing: str, pools: FramePools, *, mcap_logs: int, mcap_seconds: float, lerobot_sets: int,
                lerobot_episodes: int, lerobot_seconds: float, seed: int = 0) -> Fleet:
    """``mcap_logs`` MCAP logs under ``landing/mcap/`` and ``lerobot_sets`` LeRobot datasets under
    ``landing/lerobot/``."""
    fleet = Fleet()
    os.makedirs(os.path.join(landing, "mcap"), exist_ok=True)
    for i in range(mcap_logs):
        path = os.path.join(landing, "mcap", f"arm_{seed:02d}_{i:03d}.mcap")
        fleet.frames[path] = write_mcap(path, seconds=mcap_seconds, jpegs=pools.jpegs, seed=seed * 1000 + i)
        fleet.mcap.append(path)
    for d in range(lerobot_sets):
        root = os.path.join(landing, "lerobot", f"so100_{seed:02d}_{d:03d}")
        fleet.frames[root] = write_lerobot(root, episodes=lerobot_episodes, seconds=lerobot_seconds,
                                           pool=pools.video, seed=seed * 1000 + d)
        fleet.lerobot.append(root)
    return fleet


def car_episode(index: int, *, frames: int, seed: int = 0) -> dict[str, Any]:
    """A synthetic 64x64 episode of worldloop's car world (its episode dict): a drifting sine
    gradient plus noise, smooth steer/gas/brake, states integrated from them; for the warm-up."""
    rng = np.random.default_rng([seed, index])
    t = np.arange(frames, dtype=np.float32)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) / 64
    angle, cycles = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 4.0)
    wave = 2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy)
    image = rng.uniform(80, 170, 3) + rng.uniform(40, 100, 3) * np.sin(
        wave[None, :, :, None] + rng.uniform(0.05, 0.2) * t[:, None, None, None] + rng.uniform(0, 2 * np.pi, 3))
    image += rng.integers(-4, 5, image.shape)
    period = rng.uniform(60, 200)
    steer = 0.7 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    gas = 0.5 + 0.4 * np.sin(2 * np.pi * t / (1.7 * period))
    brake = np.clip(-0.8 * np.sin(2 * np.pi * t / (1.7 * period)), 0.0, 1.0)
    actions = np.stack([steer, gas, brake], axis=1).astype(np.float32)
    dt, speed = 0.02, 10.0 + 20.0 * gas
    heading = np.cumsum(2.0 * steer * dt)
    vx, vy = speed * np.cos(heading), speed * np.sin(heading)
    states = np.stack([np.cumsum(vx * dt), np.cumsum(vy * dt), heading, vx, vy, speed, 2.0 * steer,
                       np.ones(frames)], axis=1).astype(np.float32)
    interventions = np.zeros(frames, bool)
    if index % 3 == 1:
        interventions[frames // 3:frames // 3 + 10] = True
    return {"frames": np.clip(image, 0, 255).astype(np.uint8),
            "timestamps_ns": START_NS + index * 10**12 + np.arange(frames, dtype=np.int64) * 20_000_000,
            "actions": actions, "expert_actions": np.clip(actions + rng.normal(0, 0.02, actions.shape), [-1, 0, 0], 1),
            "states": states, "rewards": (0.1 * speed / 30.0).astype(np.float32), "interventions": interventions,
            "off_track": np.zeros(frames, bool), "world": "carracing", "seed": seed * 100_000 + index,
            "driver": "bench", "policy_version": ""}
