"""Post-training is resumable: a run whose driver is killed mid-way, started again with the same
inputs, resumes from its latest checkpoint and ends with the weights of an uninterrupted run."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from safetensors.numpy import load_file

from models import world_model
from stages.curate import episode_to_tables
from stages.lake import Lake
from stages.train import TRAINER_STATE, train_model

SIZE = 16
CONFIG = dataclasses.replace(world_model.preset("tiny"), image_size=SIZE, batch_size=4, steps=16)


@pytest.fixture(scope="module")
def frames_uri(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    tables = []
    for i in range(3):
        n = 25
        frames = np.clip(rng.integers(0, 255, (1, SIZE, SIZE, 3)) + np.arange(n)[:, None, None, None] * 3, 0, 255)
        actions = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        episode = {"frames": frames.astype(np.uint8), "actions": actions, "labels": actions,
                   "states": np.zeros((n, 1), np.float32), "instruction": "drive",
                   "timestamps_ns": np.arange(n, dtype=np.int64) * 20_000_000}
        tables.append(episode_to_tables(episode, episode_id=f"ep-{i}", source_uri="", content_hash="", turn=0,
                                        origin="real", parent_episode_id="", generator_version="",
                                        label_source="privileged_expert", split="train")[1])
    lake = Lake(str(tmp_path_factory.mktemp("lake")))
    lake.append("frames", pa.concat_tables(tables), key="frame_id")
    return lake.table_uri("frames")


def weights(result: dict) -> dict[str, np.ndarray]:
    return load_file(os.path.join(result["checkpoint_dir"], "model.safetensors"))


def test_a_killed_run_resumes_to_the_same_weights(ray_cluster, frames_uri, tmp_path, capfd):
    common = {"frames_uri": frames_uri, "num_workers": 2, "cpus_per_worker": 0.5, "checkpoint_every": 5,
              "seed": 7, "run_name": "resume-test"}
    whole = train_model("world_model", model_config=CONFIG, storage_path=str(tmp_path / "whole"), **common)
    assert "resumed_from" not in whole["metrics"] and whole["metrics"]["step"] == CONFIG.steps
    bar = capfd.readouterr().err  # the driver's step bar, fed by rank 0, ends at the last step
    assert "train resume-test: 100%" in bar and f"{CONFIG.steps}/{CONFIG.steps}" in bar and "loss=" in bar

    killed = tmp_path / "killed"
    script = tmp_path / "train.py"
    script.write_text(
        "import dataclasses, json, sys, ray\n"
        "from models import world_model\nfrom stages.train import train_model\n"
        f"ray.init(address={ray_cluster.get_runtime_context().gcs_address!r}, log_to_driver=False)\n"
        f"config = world_model.config_from_dict(json.loads({json.dumps(json.dumps(dataclasses.asdict(CONFIG)))}))\n"
        f"train_model('world_model', model_config=config, storage_path={str(killed)!r}, **{common!r})\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=os.getcwd(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        deadline = time.time() + 180
        # Ray Train records a reported checkpoint in its run snapshot: kill after the first one
        while not glob.glob(str(killed / "*" / "checkpoint_manager_snapshot.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no mid-run checkpoint within 180 s"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()

    resumed = train_model("world_model", model_config=CONFIG, storage_path=str(killed), **common)
    assert 0 < resumed["metrics"]["resumed_from"] < CONFIG.steps
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not os.path.exists(os.path.join(resumed["checkpoint_dir"], TRAINER_STATE))  # the result is weights only


def test_bf16_mixed_precision_trains_fp32_weights(ray_cluster, frames_uri, tmp_path):
    """The forward runs under bfloat16 autocast; weights, optimizer and checkpoint stay fp32."""
    with pytest.raises(ValueError, match="precision must be one of"):
        train_model("world_model", frames_uri=frames_uri, model_config=CONFIG, storage_path=str(tmp_path),
                    precision="fp16")
    config = dataclasses.replace(CONFIG, steps=6)
    runs = {p: train_model("world_model", frames_uri=frames_uri, model_config=config, storage_path=str(tmp_path),
                           num_workers=1, precision=p, seed=3) for p in ("bf16", "fp32")}
    assert runs["bf16"]["checkpoint_dir"] != runs["fp32"]["checkpoint_dir"]  # another run, not a resumed one
    bf16, fp32 = weights(runs["bf16"]), weights(runs["fp32"])
    assert runs["bf16"]["metrics"]["step"] == 6 and np.isfinite(runs["bf16"]["metrics"]["loss"])
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in bf16.values())
    # the same seed, batches and noise: only the arithmetic differs, a little
    gaps = [np.abs(bf16[k] - fp32[k]).max() for k in fp32]
    assert 0 < max(gaps) < 0.05
