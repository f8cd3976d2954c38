"""schemathesis ``run --checks all`` against the live OpenAPI schemas of act, predict and report (one world,
deployed by ``deploy_world`` with tiny models): any finding fails the test.

Two settings, both deliberate (see the config written below):

* ``positive_data_acceptance`` also accepts 400 for schema-valid requests. The only 400 the apps give is
  for a ``png_base64`` frame that is not a decodable 8-bit RGB PNG of the stated size: the schema says
  ``contentEncoding: base64, contentMediaType: image/png`` and documents that 400, but JSON Schema cannot
  make a generator produce decodable PNGs, so random base64 is schema-valid and still refused. The raw
  and list encodings are exact in the schema and never give a 400.
* the ``large_base_example`` health check is suppressed: the smallest valid request holds K whole frames
  (thousands of integers in the list encoding); that is the interface, not a schema defect.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from models.policy import Policy, preset, save
from serving.app import deploy_world
from stages.lake import Lake
from stages.registry import Registry
from stages.schemas import TURNS
from tests.conftest import free_port
from tests.serving.test_predict_report import WORLD, register_world_models, turn_row

CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""
MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def urls(ray_cluster, tmp_path_factory):
    from ray import serve

    tmp = tmp_path_factory.mktemp("schemathesis")
    registry = Registry(str(tmp / "lake"))
    register_world_models(registry, tmp)
    save(Policy(preset("tiny")).eval(), tmp / "policy")
    registry.set_alias("policy", "champion", registry.register("policy", tmp / "policy", kind="policy").version)
    Lake(registry.uri).append("turns", pa.Table.from_pylist([turn_row(1)], schema=TURNS), key="turn")
    out = deploy_world(registry_uri=registry.uri, world=WORLD, port=free_port())
    (tmp / "schemathesis.toml").write_text(CONFIG)
    try:
        assert not out["skipped"], out["skipped"]
        yield out["urls"], tmp / "schemathesis.toml"
    finally:
        for name in out["urls"]:
            serve.delete(name)


@pytest.mark.parametrize("app", ["act", "predict", "report"])
def test_schemathesis_finds_nothing(urls, app):
    found, config = urls
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "--no-color", "--config-file", str(config), "run", f"{found[f'{app}-{WORLD}']}/openapi.json",
         "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--seed", "1",
         "--suppress-health-check", "large_base_example", "--request-timeout", "30"],
        capture_output=True, text=True, timeout=300)
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    assert "passed" in summary and "failure" not in summary.lower(), summary
