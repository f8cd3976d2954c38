"""The Cosmos adapter on a tiny random Cosmos 3 pipeline built from the real diffusers classes (no
download): loading from a local directory and from S3, the world-model contract, the clear errors."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer, UniPCMultistepScheduler
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from models import cosmos
from stages import storage, weights

S = 16  # frame side: one latent at the Wan 2.2 VAE's spatial factor 16
SETTINGS = {"domain_name": "pusht", "chunk_size": 4, "num_inference_steps": 2, "guidance_scale": 1.0,
            "resolution_tier": 256}
WORDS = ("<unk>", "<|endoftext|>", "<|vision_start|>", "system", "user", "assistant", "push", "pull", "the", "block")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the chat template and special tokens the pipeline asks for."""
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                  additional_special_tokens=["<|vision_start|>"])
    out.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    return out


def tiny_pipeline(action_dim: int = 4) -> Cosmos3OmniPipeline:
    """Cosmos 3 with one 32-wide transformer layer and an 8-channel Wan 2.2 VAE (16 latent channels)."""
    torch.manual_seed(0)
    z = 16
    transformer = Cosmos3OmniTransformer(
        head_dim=16, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=1, latent_channel=z, latent_patch_size=2, patch_latent_dim=4 * z, rope_axes_dim=[4, 2, 2],
        action_dim=action_dim, action_gen=True, vocab_size=len(WORDS))
    vae = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[0.0] * z, latents_std=[1.0] * z)
    return Cosmos3OmniPipeline(transformer=transformer, text_tokenizer=tiny_tokenizer(), vae=vae,
                               scheduler=UniPCMultistepScheduler(), enable_safety_checker=False)


@pytest.fixture(scope="module")
def cosmos_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cosmos") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(cosmos_dir):
    return cosmos.load(cosmos_dir, **SETTINGS)


def history(batch: int, frames: int = 2, side: int = S, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, frames, side, side, 3), dtype=np.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_loads_the_diffusers_classes_and_records_what_it_loaded(model, cosmos_dir, tmp_path):
    c = model.config
    assert (c.pipeline_class, c.transformer_class, c.vae_class) == (
        "Cosmos3OmniPipeline", "Cosmos3OmniTransformer", "AutoencoderKLWan")
    assert c.source == str(cosmos_dir) and c.action_dim == model.action_dim == 2  # pusht's width
    assert model.pipeline.safety_checker is None and model.history == 1  # as the checkpoint says
    copy = shutil.copytree(cosmos_dir, tmp_path / "with-config")
    assert model.save_config(copy) == str(copy / cosmos.CONFIG_NAME)
    assert json.loads((copy / cosmos.CONFIG_NAME).read_text())["num_inference_steps"] == 2
    assert cosmos.load(copy).config == dataclasses.replace(model.config, source=str(copy))  # settings from the file
    assert cosmos.load(copy, num_inference_steps=3).config.num_inference_steps == 3


def test_predict_and_rollout_follow_the_world_model_contract(model):
    h, a = history(2), np.array([[0.5, -0.5], [-1.0, 1.0]], np.float32)
    frame = model.predict(h, a, generator=gen())
    assert frame.shape == (2, S, S, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, model.predict(h, a, generator=gen()))
    # only the last history frame is read; a held action makes predict the first step of a rollout
    np.testing.assert_array_equal(frame, model.predict(h[:, -1:], a, generator=gen()))
    held = np.repeat(a[:, None], 2, axis=1)
    frames = model.rollout(h, held, generator=gen())
    assert frames.shape == (2, 2, S, S, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[:, 0], frame)
    # the action and the sampling noise change the frame
    assert not np.array_equal(model.predict(h, -a, generator=gen()), frame)
    assert not np.array_equal(model.predict(h, a, generator=gen(1)), frame)
    # torch in, torch out
    out = model.predict(torch.from_numpy(h), torch.from_numpy(a), generator=gen())
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(frame))


def test_rollout_runs_chunk_after_chunk(model):
    actions = np.random.default_rng(1).uniform(-1, 1, (1, 6, 2)).astype(np.float32)  # chunks of 4 and 2
    tasks = ["push the block"]
    frames = model.rollout(history(1), actions, steps=1, generator=gen(), tasks=tasks)
    assert frames.shape == (1, 6, S, S, 3)
    g = gen()  # the same noise, chunk by chunk: the second chunk starts from the first one's last frame
    first = model.rollout(history(1), actions[:, :4], steps=1, generator=g, tasks=tasks)
    rest = model.rollout(first[:, -1:], actions[:, 4:], steps=1, generator=g, tasks=tasks)
    np.testing.assert_array_equal(frames, np.concatenate([first, rest], axis=1))


def test_loads_from_s3(model, cosmos_dir, s3_server):
    _, options = s3_server
    uri = "s3://lake/models/cosmos-tiny"
    storage.upload_dir(cosmos_dir, uri, options)
    remote = weights.load_cosmos(uri, options, **SETTINGS)
    assert remote.config.source == uri and remote.config.action_dim == 2
    h, a = history(1), np.array([[0.3, 0.1]], np.float32)
    np.testing.assert_array_equal(remote.predict(h, a, generator=gen()), model.predict(h, a, generator=gen()))
    with pytest.raises(ValueError, match="s3://lake/models/missing does not exist or is not a diffusers pipeline"):
        weights.load_cosmos("s3://lake/models/missing", options, **SETTINGS)


def test_clear_errors_when_loading(cosmos_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a diffusers pipeline"):
        cosmos.load(tmp_path / "nowhere", **SETTINGS)
    with pytest.raises(ValueError, match="domain_name"):
        cosmos.load(cosmos_dir)  # no worldloop_cosmos.json and no settings
    with pytest.raises(ValueError, match="Unknown Cosmos3 action domain_name"):
        cosmos.load(cosmos_dir, **{**SETTINGS, "domain_name": "unicycle"})
    with pytest.raises(ValueError, match="wider than the checkpoint's action head"):
        cosmos.load(cosmos_dir, **{**SETTINGS, "domain_name": "av"})  # 9-wide actions, a 4-wide head
    with pytest.raises(ValueError, match="multiple of the VAE's temporal factor 4"):
        cosmos.load(cosmos_dir, **{**SETTINGS, "chunk_size": 3})
    broken = shutil.copytree(cosmos_dir, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match=r"lacks the pipeline component\(s\) \['vae'\]"):
        cosmos.load(broken, **SETTINGS)
    shutil.copytree(cosmos_dir / "vae", broken / "vae")
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps({**config, "action_gen": False}))
    with pytest.raises(ValueError, match="not trained with actions"):
        cosmos.load(broken, **SETTINGS)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "Cosmos2VideoToWorldPipeline"}))
    with pytest.raises(ValueError, match="holds a Cosmos2VideoToWorldPipeline, not a Cosmos3OmniPipeline"):
        cosmos.load(broken, **SETTINGS)


def test_clear_errors_when_predicting(model):
    h, a = history(1), np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match=r"actions must be \[B, T, 2\] \(domain 'pusht'\)"):
        model.predict(h, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="at least 1 frame"):
        model.predict(h[:, :0], a)
    with pytest.raises(ValueError, match="uint8"):
        model.predict(h.astype(np.float32), a)
    with pytest.raises(ValueError, match="multiples of the VAE's spatial factor 16"):
        model.predict(history(1, side=24), a)
    with pytest.raises(ValueError, match="NaN"):
        model.predict(h, np.full((1, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="one per row"):
        model.predict(h, a, tasks=["push", "pull"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model.predict(h, a, steps=0)
    with pytest.raises(ValueError, match="do not fit the resolution tier 256's canvas"):
        model.predict(history(1, frames=1, side=272), a, steps=1)  # downscaled into the 256x256 canvas
