"""The two references the curate flow is measured against, on the logs of ``benchmarks.fleet_logs``.

Both bring every camera frame to the benchmark's target resolution the way the flow does:
frames whose longer side is over ``max_side`` are shrunk with Pillow's BOX filter keeping the
aspect ratio (``target_size``: the rule of ``curate.max_image_side``); smaller frames stay.

* The script (``script_mcap``, ``script_lerobot``): what a user writes first, one process,
  one log at a time, default library settings. MCAP: the ``mcap`` reader with
  ``mcap_ros2.decoder.DecoderFactory``, ``iter_decoded_messages()`` over every message in log
  order; the latest joint command and joint state are held and attached to each camera frame
  (an as-of join), the JPEG decoded with Pillow and resized; per log one Arrow table (log,
  step, header stamp, RGB bytes, height, width, action, state) written with
  ``pyarrow.parquet.write_table``. LeRobot: the data parquets read with pyarrow, the mp4s
  decoded in order with PyAV (``frame.to_image()``), resized, the i-th frame joined to the i-th
  row, written to one Parquet file per dataset. No validation, quality checks, events,
  de-duplication or versioning.
* The decode-only limit (``decode_mcap``, ``decode_lerobot``): decoding and resizing alone, in
  one thread pinned to one core (``one_core``; PyAV's decoder told to use one thread): MCAP
  camera messages only (``iter_decoded_messages(topics=[camera])``), each JPEG decoded and
  shrunk the way the flow does it, by its own decoder (``ros_messages.compressed_to_rgb`` at the
  target size: libjpeg's DCT scaling, then BOX), so the limit is what the flow's decoding could
  reach, not a slower decoder's; LeRobot mp4 decode to RGB arrays (+ resize when over
  ``max_side``). Nothing is aligned, kept or written: frames/s of this is what one core can do
  at best.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
from collections.abc import Iterator

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from PIL import Image

from benchmarks.fleet_logs import CAMERA_TOPIC, COMMANDS_TOPIC, JOINT_STATES_TOPIC
from stages.formats.ros_messages import compressed_size, compressed_to_rgb


def target_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(H, W) with the longer side at most ``max_side``, aspect ratio kept (rounded)."""
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` resized with BOX to ``target_size`` when it is larger, else itself."""
    height, width = target_size(image.height, image.width, max_side)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), Image.Resampling.BOX)


def _vectors(rows: list[list[float] | None]) -> pa.Array:
    return pa.array(rows, pa.list_(pa.float32()))


def script_mcap(paths: list[str], out_dir: str, *, max_side: int) -> int:
    """The script over MCAP logs (module doc); frames written."""
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for path in paths:
        images, heights, widths, stamps, actions, states = [], [], [], [], [], []
        command = state = None
        with open(path, "rb") as stream:
            reader = make_reader(stream, decoder_factories=[DecoderFactory()])
            for _, channel, _, msg in reader.iter_decoded_messages():
                if channel.topic == COMMANDS_TOPIC:
                    command = list(msg.data)
                elif channel.topic == JOINT_STATES_TOPIC:
                    state = list(msg.position)
                elif channel.topic == CAMERA_TOPIC:
                    image = shrink(Image.open(io.BytesIO(msg.data)).convert("RGB"), max_side)
                    images.append(image.tobytes())
                    heights.append(image.height)
                    widths.append(image.width)
                    stamps.append(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)
                    actions.append(command)
                    states.append(state)
        name = os.path.splitext(os.path.basename(path))[0]
        table = pa.table({"log": [name] * len(images), "step": list(range(len(images))),
                          "timestamp_ns": pa.array(stamps, pa.int64()), "image": pa.array(images, pa.binary()),
                          "height": pa.array(heights, pa.int32()), "width": pa.array(widths, pa.int32()),
                          "action": _vectors(actions), "state": _vectors(states)})
        pq.write_table(table, os.path.join(out_dir, f"{name}.parquet"))
        written += table.num_rows
    return written


def script_lerobot(roots: list[str], out_dir: str, *, max_side: int) -> int:
    """The script over LeRobot datasets (module doc); frames written."""
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for root in roots:
        with open(os.path.join(root, "meta", "info.json")) as f:
            info = json.load(f)
        camera = next(k for k, v in info["features"].items() if v["dtype"] == "video")
        rows = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(f"{root}/data/*/*.parquet"))])
        images, heights, widths = [], [], []
        for video in sorted(glob.glob(f"{root}/videos/{camera}/*/*.mp4")):
            with av.open(video) as container:
                for frame in container.decode(video=0):
                    image = shrink(frame.to_image(), max_side)
                    images.append(image.tobytes())
                    heights.append(image.height)
                    widths.append(image.width)
        if len(images) != rows.num_rows:
            raise RuntimeError(f"{root}: {len(images)} frames for {rows.num_rows} rows")
        table = rows.append_column("image", pa.array(images, pa.binary())) \
            .append_column("height", pa.array(heights, pa.int32())).append_column("width", pa.array(widths, pa.int32()))
        pq.write_table(table, os.path.join(out_dir, f"{os.path.basename(root)}.parquet"))
        written += table.num_rows
    return written


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """Pin the calling thread to one CPU while inside (where the OS allows it)."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def decode_mcap(paths: list[str], *, max_side: int) -> int:
    """The decode-only limit over MCAP logs (module doc; call it inside ``one_core``); frames."""
    frames = 0
    for path in paths:
        with open(path, "rb") as stream:
            reader = make_reader(stream, decoder_factories=[DecoderFactory()])
            for *_, msg in reader.iter_decoded_messages(topics=[CAMERA_TOPIC]):
                height, width = compressed_size(msg.format, msg.data)
                compressed_to_rgb(msg.format, msg.data, target_size(height, width, max_side))
                frames += 1
    return frames


def decode_lerobot(roots: list[str], *, max_side: int) -> int:
    """The decode-only limit over LeRobot datasets (module doc; inside ``one_core``); frames."""
    frames = 0
    for root in roots:
        for video in sorted(glob.glob(f"{root}/videos/*/*/*.mp4")):
            with av.open(video) as container:
                stream = container.streams.video[0]
                stream.codec_context.thread_count = 1
                for frame in container.decode(stream):
                    rgb = frame.to_ndarray(format="rgb24")
                    if target_size(*rgb.shape[:2], max_side) != rgb.shape[:2]:
                        np.asarray(shrink(Image.fromarray(rgb), max_side))
                    frames += 1
    return frames
