"""Session-wide harnesses: one local Ray cluster, one Prefect test API, one S3 server (moto).

Everything is started lazily by the first test that asks for it, and torn down once.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from serving.cluster import free_port  # the tests import it from here

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="worldloop-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch with 2 threads on 2 busy cores is 15-70x slower
# Ray Train's controller polls its workers every 2 s by default, so each short fit ends up to 2 s
# after its loop does (and starts later): 0.25 s takes ~3.5 s off each of the suite's fits
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread for the tests' own torch work: tiny models on 2 busy cores are many times
    slower with two."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (4 logical CPUs on 2 cores, see STACK.md)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False, ignore_reinit_error=True)
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; yields (endpoint_url, storage_options) with a bucket `lake`."""
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket="lake")
    options = {"access_key_id": "testing", "secret_access_key": "testing", "endpoint": endpoint,
               "region": "us-east-1", "allow_http": "true"}
    yield endpoint, options
    proc.terminate()
    proc.wait(timeout=10)
