"""Model checkpoints to and from S3 (moto's server): a model writes a local directory and
``stages.storage`` copies it (``upload_dir``, ``local_copy``), as the stages that load models do."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import checkpoint, policy, reasoner, world_model
from sim import worlds
from stages import curate_ray, storage
from stages.describe import reasoner_config_for
from tests.models.test_checkpoint import Toy, ToyConfig, toy_from_dict
from tests.models.test_policy import ARM, TASKS, arm, frames, states  # noqa: F401  (arm: a fixture)
from tests.models.test_reasoner import build_tiny_vlm, random_clips
from tests.models.test_world_model import trained  # noqa: F401  (a fixture)


def test_checkpoint_s3(s3_server, tmp_path):
    _, options = s3_server
    torch.manual_seed(1)
    model = Toy(ToyConfig(width=6))
    uri = "s3://lake/models/toy/v1/"
    written = checkpoint.save(model, tmp_path / "toy", extra_files={"vocab.txt": "a b"})
    assert storage.upload_dir(written, uri, options) == uri
    with storage.local_copy(uri, options) as local:
        again = checkpoint.load(Toy, toy_from_dict, local)
    assert again.config == model.config
    x = torch.randn(3, 6)
    assert torch.equal(again.lin(x), model.lin(x))
    with storage.local_copy(uri, options) as local:  # the whole prefix
        ckpt = checkpoint.read(local, extra_files=("vocab.txt",))
        assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert ckpt.files == {"vocab.txt": b"a b"} and ckpt.model == "Toy"
    with pytest.raises(ValueError, match="does not exist or is not a toy checkpoint"):
        with storage.local_copy("s3://lake/models/toy/missing", options) as local:
            checkpoint.load(Toy, toy_from_dict, local, what="toy")
    with storage.local_copy("s3://lake/models/toy/missing", options) as local:
        assert list(local.iterdir()) == []


def test_policy_s3(arm, s3_server, tmp_path):  # noqa: F811
    _, options = s3_server
    uri = "s3://lake/models/policy/test-v1"
    storage.upload_dir(policy.save(arm, tmp_path / "policy"), uri, options)
    with storage.local_copy(uri, options) as local:
        again = policy.load(local)
    x, s = frames(ARM, 2, seed=2), states(2, seed=2)
    np.testing.assert_array_equal(again.act(x, s, list(TASKS[1:])), arm.act(x, s, list(TASKS[1:])))


def test_world_model_s3(trained, tmp_path, s3_server):  # noqa: F811
    _, options = s3_server
    model, (history, action, _), _, _ = trained
    world_model.save(model, tmp_path / "wm")
    storage.upload_dir(tmp_path / "wm", "s3://lake/models/wm-test", options)
    with storage.local_copy("s3://lake/models/wm-test", options) as local:
        restored = world_model.load(local)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.predict(history, action, generator=g()),
                       restored.predict(history, action, generator=g()))
    with pytest.raises(ValueError, match="does not exist"):
        with storage.local_copy("s3://lake/models/missing", options) as local:
            world_model.load(local)


def test_reasoner_s3(s3_server, tmp_path):
    """The describer's reasoner (``curate_ray._reasoner``, as for ``--reasoner s3://...``) from S3.
    An untrained tiny reasoner: a checkpoint round trip does not depend on training."""
    _, options = s3_server
    spec = worlds.spec("carracing")
    torch.manual_seed(0)
    model = reasoner.Reasoner(reasoner_config_for(spec, "tiny")).eval()
    uri = "s3://lake/models/reasoner/test-v1"
    storage.upload_dir(reasoner.save(model, tmp_path / "reasoner"), uri, options)
    again = curate_ray._reasoner(uri, options, spec)
    assert isinstance(again, reasoner.Reasoner)
    clips = random_clips(model.config, 2, seed=3)
    np.testing.assert_array_equal(again.embed(clips[:, 0]), model.embed(clips[:, 0]))
    with pytest.raises(ValueError, match="s3://lake/models/reasoner/missing holds neither"):
        curate_ray._reasoner("s3://lake/models/reasoner/missing", options, spec)


def test_describer_asks_a_pretrained_vlm_in_the_worlds_words(tmp_path):
    """A Hugging Face vision-language model as the describer of the arm's clips: asked for the
    arm's tags and told the arm's events (not the reasoner module's placeholder vocabulary)."""
    build_tiny_vlm(tmp_path / "vlm")
    spec = worlds.spec("metaworld-mt10")
    vlm = curate_ray._reasoner(str(tmp_path / "vlm"), None, spec)
    assert isinstance(vlm, reasoner.HFVisionLanguageReasoner)
    assert vlm.tags == {k: tuple(v) for k, v in spec.tags.items()}
    assert {e.name for e in spec.events} <= set(vlm.events)
    clips = random_clips(reasoner.preset("tiny"), 2, seed=8)
    described = vlm.describe(clips, [spec.events[0].name, "novelty"])
    assert all(set(d["tags"]) == set(spec.tags) for d in described)
