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


COMMON = {"num_workers": 2, "cpus_per_worker": 0.5, "checkpoint_every": 5, "seed": 7, "run_name": "resume-test"}


@pytest.fixture(scope="module")
def whole(ray_cluster, frames_uri, tmp_path_factory) -> dict:
    """An uninterrupted fp32 run."""
    result = train_model("world_model", frames_uri=frames_uri, model_config=CONFIG,
                         storage_path=str(tmp_path_factory.mktemp("whole")), **COMMON)
    assert "resumed_from" not in result["metrics"] and result["metrics"]["step"] == CONFIG.steps
    return result


def test_a_killed_run_resumes_to_the_same_weights(ray_cluster, frames_uri, whole, tmp_path, capfd):
    common = {"frames_uri": frames_uri, **COMMON}
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

    capfd.readouterr()
    resumed = train_model("world_model", model_config=CONFIG, storage_path=str(killed), **common)
    assert 0 < resumed["metrics"]["resumed_from"] < CONFIG.steps
    bar = capfd.readouterr().err  # the driver's step bar, fed by rank 0, ends at the last step
    assert "train resume-test: 100%" in bar and f"{CONFIG.steps}/{CONFIG.steps}" in bar and "loss=" in bar
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not os.path.exists(os.path.join(resumed["checkpoint_dir"], TRAINER_STATE))  # the result is weights only


@pytest.mark.slow  # a fourth Ray Train run (~35 s); the default suite checks _autocast alone
def test_bf16_mixed_precision_trains_fp32_weights(frames_uri, whole, tmp_path, capfd):
    """The forward runs under bfloat16 autocast; weights, optimizer and checkpoint stay fp32. The
    same seed, batches and noise as the fp32 run: only the arithmetic differs, a little."""
    with pytest.raises(ValueError, match="precision must be one of"):
        train_model("world_model", frames_uri=frames_uri, model_config=CONFIG, storage_path=str(tmp_path),
                    precision="fp16")
    bf16 = train_model("world_model", frames_uri=frames_uri, model_config=CONFIG, storage_path=str(tmp_path),
                       precision="bf16", **COMMON)
    bar = capfd.readouterr().err  # the driver's step bar, fed by rank 0, ends at the last step
    assert "train resume-test: 100%" in bar and f"{CONFIG.steps}/{CONFIG.steps}" in bar and "loss=" in bar
    assert bf16["metrics"]["step"] == CONFIG.steps and np.isfinite(bf16["metrics"]["loss"])
    assert bf16["checkpoint_dir"] != whole["checkpoint_dir"]  # its own run, not the fp32 one resumed
    a, b = weights(whole), weights(bf16)
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in b.values())
    gaps = [np.abs(a[k] - b[k]).max() for k in a]
    assert 0 < max(gaps) < 0.05


def test_a_warm_start_trains_in_train_mode(tmp_path):
    """`load` gives a model in eval mode; a fit warm-started from it must run with its dropout and
    augmentation on (they were off for every warm-started turn before this was caught)."""
    from models import policy
    from stages.train import _build

    config = dataclasses.replace(policy.preset("tiny"), dropout=0.5, shift=2)
    policy.save(policy.Policy(config), tmp_path)
    model = _build("policy", dataclasses.asdict(config), str(tmp_path))
    assert model.training and all(m.training for m in model.modules())
