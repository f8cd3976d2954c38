"""The scene reasoner: config, decoding contract, embeddings, it learns CarRacing tags, any world's
vocabulary, checkpoints, and a (tiny, random, built offline) Hugging Face vision-language model
behind the same interface."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from models.reasoner import (CONFIG_NAME, PRESETS, UNKNOWN, HFVisionLanguageReasoner, Reasoner, ReasonerConfig,
                             _mirror, config_from_dict, default_caption, load, load_reasoner, parse_tags, preset,
                             save, train_reasoner)
from sim import worlds
from sim.rollout import run_episode
from sim.worlds.base import WorldConfig
from stages.describe import clip_frames, reasoner_config_for, vocabulary

CLIP = 10  # steps per clip in the CarRacing data below
CAR = worlds.get("carracing")
TAGS, EVENTS = vocabulary(CAR.spec)
CAR_TINY = reasoner_config_for(CAR.spec, "tiny")  # the tiny preset with the car's vocabulary
ARM_TAGS = {"phase": ("reach", "grasp", "place"), "gripper": ("open", "closed")}  # a non-car vocabulary
ARM_EVENTS = ("none", "intervention", "grasp")


def random_clips(cfg: ReasonerConfig, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, cfg.frames_per_clip, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)


def carracing_clips(seeds: range, stride: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """Clips of noisy-expert CarRacing episodes (32 px, 200 steps), their events and privileged tags."""
    world = worlds.get(WorldConfig(name="carracing", image_size=32, max_steps=200,
                                   options={"noise": {"pulse_prob": 0.03}}))
    k = preset("tiny").frames_per_clip
    clips, events, tags = [], [], []
    for seed in seeds:
        ep, _ = run_episode(world=world, seed=seed, driver=world.expert(noisy=True))
        for a in range(20, len(ep["frames"]) - CLIP + 1, stride):
            clips.append(clip_frames(ep["frames"], a, a + CLIP, k))
            events.append("intervention" if ep["interventions"][a:a + CLIP].any() else "none")
            tags.append(world.privileged_tags(ep["states"][a:], {n: v[a:] for n, v in ep["signals"].items()},
                                              clip_len=CLIP))
    return np.stack(clips), events, tags


@pytest.fixture(scope="module")
def trained() -> tuple[Reasoner, dict]:
    """The tiny preset trained on 6 episodes, scored on 3 held-out ones."""
    train = carracing_clips(range(6), stride=4)
    val = carracing_clips(range(100, 103), stride=CLIP)
    return train_reasoner(*train, config=reasoner_config_for(CAR.spec, "tiny"), val_clips=val[0], val_events=val[1],
                          val_tags=val[2])


def test_presets_derive_and_validate():
    assert set(PRESETS) == {"tiny", "default", "gpu"}
    assert preset("tiny").image_size == 32 and preset("default").image_size == 64
    assert preset("gpu").d_model > preset("default").d_model
    with pytest.raises(ValueError, match="unknown reasoner preset"):
        preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        ReasonerConfig(image_size=60)
    with pytest.raises(ValueError, match="n_heads"):
        ReasonerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match=">= 1"):
        ReasonerConfig(frames_per_clip=0)
    with pytest.raises(ValueError, match="mirror_prob"):
        ReasonerConfig(mirror_prob=1.5)
    cfg = preset("default")  # a placeholder vocabulary of no world; a world's comes from its spec
    assert not {"curvature", "phase"} & set(cfg.tags) and cfg.mirror == {} and "off_track" not in cfg.events
    car = reasoner_config_for(CAR.spec, "default")
    assert (car.tags, car.events, car.mirror) == (TAGS, EVENTS, dict(CAR.spec.mirror))
    assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    old = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items()
           if k not in ("tags", "events", "mirror")}
    assert config_from_dict(old) == cfg  # written before the vocabulary was in the config
    with pytest.raises(ValueError, match="unknown ReasonerConfig fields"):
        config_from_dict({"colour": "red"})


@pytest.mark.parametrize("vocab, match", [
    ({"tags": {}}, "at least one tag"),
    ({"tags": {"phase": "reach"}, "mirror": {}}, "not one string"),
    ({"tags": {"phase": ("reach", "reach")}, "mirror": {}}, "distinct"),
    ({"tags": {"phase": ("reach", UNKNOWN)}, "mirror": {}}, "distinct"),
    ({"events": ("none", "none")}, "events must be distinct"),
    ({"events": ()}, "events must be"),
    ({"mirror": {"phase": {"reach": "place"}}}, "maps outside"),
    ({"mirror": {"curvature": {"left": "up"}}}, "maps outside"),
    ({"tags": {"a": ("b=",), "b": ("x",)}, "mirror": {}}, "collide"),  # value "b=" is key token "b="
])
def test_vocabulary_is_validated(vocab, match):
    with pytest.raises(ValueError, match=match):
        ReasonerConfig(**vocab)


def test_untrained_describe_and_embed_contract():
    torch.manual_seed(0)
    model = Reasoner(CAR_TINY)
    clips = random_clips(model.config, 5)
    events = list(EVENTS[:5])
    out = model.describe(clips, events)
    assert len(out) == 5 and model.training  # describe restores the mode it found
    for d, e in zip(out, events):
        assert set(d["tags"]) == set(TAGS) and all(d["tags"][k] in TAGS[k] for k in TAGS)  # constrained
        assert d["caption"] == default_caption(d["tags"], e) and d["caption"].endswith(f"event: {e}")
    car = model.describe(clips, events, caption_fn=CAR.caption)  # the world's caption, same tags
    assert [d["tags"] for d in car] == [d["tags"] for d in out]
    assert [d["caption"] for d in car] == [CAR.caption(d["tags"], e) for d, e in zip(out, events)]
    emb = model.embed(clips[:, -1])
    assert emb.shape == (5, model.config.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.embed(clips[:1, -1]), emb[:1], atol=1e-6)  # batch-independent
    clip_emb, described = model.describe_and_embed(clips, events)  # one encoder pass for both
    assert described == out
    per_frame = model.embed(clips.reshape(-1, *clips.shape[2:])).reshape(5, clips.shape[1], -1).mean(axis=1)
    np.testing.assert_allclose(clip_emb, per_frame / np.linalg.norm(per_frame, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="frames must be"):
        model.describe(clips[:, :2], events)
    with pytest.raises(ValueError, match="frames must be"):
        model.embed(clips[:, -1].astype(np.float32))
    with pytest.raises(ValueError, match="unknown events"):
        model.describe(clips, ["none", "none", "crash", "none", "none"])
    with pytest.raises(ValueError, match="events"):
        model.describe(clips, events[:4])
    with pytest.raises(ValueError, match="is not one of"):
        model.loss(clips[:1], ["none"], [{"curvature": "up", "track": "on", "speed": "slow"}])
    assert len(model.vocab) == len(set(model.vocab)) == model.lm.config.vocab_size


def test_event_token_conditions_the_answer():
    """With the same frames, a learnable link from event to tag is picked up (the prompt is read)."""
    cfg = dataclasses.replace(CAR_TINY, steps=60)
    clips = np.repeat(random_clips(cfg, 1), 32, axis=0)
    events = ["off_track", "none"] * 16
    tags = [{"curvature": "left", "track": "off" if e == "off_track" else "on", "speed": "slow"} for e in events]
    model, metrics = train_reasoner(clips, events, tags, config=cfg, val_clips=clips[:2], val_events=events[:2],
                                    val_tags=tags[:2])
    assert [d["tags"]["track"] for d in model.describe(clips[:2], events[:2])] == ["off", "on"]
    assert metrics["val"]["accuracy"]["track"] == 1.0 and metrics["val"]["majority_accuracy"]["track"] == 0.5


def test_training_is_deterministic_given_the_seed():
    cfg = dataclasses.replace(CAR_TINY, steps=3)
    clips = random_clips(cfg, 8, seed=1)
    events, tags = ["none"] * 8, [{"curvature": "right", "track": "on", "speed": "fast"}] * 8
    a, _ = train_reasoner(clips, events, tags, config=cfg)
    b, _ = train_reasoner(clips, events, tags, config=cfg)
    c, _ = train_reasoner(clips, events, tags, config=dataclasses.replace(cfg, seed=1))
    np.testing.assert_array_equal(a.embed(clips[:, 0]), b.embed(clips[:, 0]))
    assert not np.array_equal(a.embed(clips[:, 0]), c.embed(clips[:, 0]))
    with pytest.raises(ValueError, match="together"):
        train_reasoner(clips, events, tags, config=cfg, val_clips=clips)


def test_any_world_vocabulary(tmp_path):
    """A non-car vocabulary (an arm's phases and gripper, its own events, no mirror) trains, describes
    with values only from it, and survives a checkpoint."""
    cfg = dataclasses.replace(preset("tiny"), steps=20, tags=ARM_TAGS, events=ARM_EVENTS, mirror={})
    assert config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    clips = random_clips(cfg, 12, seed=5)
    events = [ARM_EVENTS[i % 3] for i in range(12)]
    tags = [{"phase": ARM_TAGS["phase"][i % 3], "gripper": "closed" if e == "grasp" else "open"}
            for i, e in enumerate(events)]
    model, metrics = train_reasoner(clips, events, tags, config=cfg, val_clips=clips[:6], val_events=events[:6],
                                    val_tags=tags[:6])
    assert set(metrics["val"]["accuracy"]) == set(ARM_TAGS) and metrics["val"]["n"] == 6
    assert {"event:grasp", "grasp", "phase=", "gripper="} <= set(model.vocab)  # event and value tokens apart
    assert not {"curvature=", "left", "event:off_track"} & set(model.vocab)
    out = model.describe(clips, events)
    for d, e in zip(out, events):
        assert set(d["tags"]) == set(ARM_TAGS) and all(d["tags"][k] in ARM_TAGS[k] for k in ARM_TAGS)
        assert d["caption"] == f"phase {d['tags']['phase']}, gripper {d['tags']['gripper']}; event: {e}"
    said = model.describe(clips[:2], events[:2], caption_fn=lambda t, e: f"{t['phase']} ({e})")
    assert [d["caption"] for d in said] == [f"{d['tags']['phase']} ({e})" for d, e in zip(out, events[:2])]
    with pytest.raises(ValueError, match="unknown events"):
        model.describe(clips[:1], ["off_track"])
    with pytest.raises(ValueError, match="is not one of"):
        model.loss(clips[:1], ["none"], [{"curvature": "left", "track": "on", "speed": "slow"}])
    save(model, tmp_path / "arm")
    again = load_reasoner(tmp_path / "arm")
    assert again.config == cfg and again.vocab == model.vocab and again.describe(clips, events) == out


def test_mirror_map_and_no_mirror():
    clips = random_clips(preset("tiny"), 3, seed=6)
    tags = [{"side": "l", "phase": "reach"}, {"side": "r", "phase": "grasp"}, {"side": "l", "phase": "place"}]
    flip = np.array([True, True, False])
    flipped, mirrored = _mirror(clips, tags, flip, {"side": {"l": "r", "r": "l"}})
    assert mirrored == [{"side": "r", "phase": "reach"}, {"side": "l", "phase": "grasp"}, tags[2]]
    np.testing.assert_array_equal(flipped[0], clips[0, :, :, ::-1])
    np.testing.assert_array_equal(flipped[2], clips[2])
    # an empty mirror map: mirror_prob is ignored (the same model with or without it)
    cfg = dataclasses.replace(preset("tiny"), steps=3, tags=ARM_TAGS, events=ARM_EVENTS, mirror={})
    clips = random_clips(cfg, 8, seed=7)
    events, tags = ["none"] * 8, [{"phase": "reach", "gripper": "open"}] * 8
    a, _ = train_reasoner(clips, events, tags, config=dataclasses.replace(cfg, mirror_prob=1.0))
    b, _ = train_reasoner(clips, events, tags, config=dataclasses.replace(cfg, mirror_prob=0.0))
    np.testing.assert_array_equal(a.embed(clips[:, 0]), b.embed(clips[:, 0]))


def test_learns_carracing_tags_on_held_out_episodes(trained):
    model, metrics = trained
    val = metrics["val"]
    assert val["n"] > 40 and metrics["n_train"] > 200
    margins = {k: val["accuracy"][k] - val["majority_accuracy"][k] for k in ("curvature", "speed")}
    assert max(margins.values()) >= 0.1, metrics
    assert val["all_correct"] > val["majority_all_correct"], metrics
    assert metrics["final_loss"] < 1.0


def test_save_load_and_load_reasoner(trained, tmp_path):
    model, _ = trained
    clips = random_clips(model.config, 4, seed=2)
    events = ["none", "hard_brake", "novelty", "none"]
    save(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([CONFIG_NAME, "model.safetensors"])
    for again in (load(tmp_path / "ckpt"), load_reasoner(tmp_path / "ckpt")):
        assert isinstance(again, Reasoner) and again.config == model.config and not again.training
        assert again.describe(clips, events) == model.describe(clips, events)
        np.testing.assert_array_equal(again.embed(clips[:, 0]), model.embed(clips[:, 0]))
    with pytest.raises(ValueError, match="not a reasoner checkpoint"):
        load(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither"):
        load_reasoner(tmp_path / "missing")


def test_parse_tags():
    assert parse_tags("curvature=left track=off speed=fast", TAGS) == {"curvature": "left", "track": "off",
                                                                  "speed": "fast"}
    assert parse_tags("Speed: SLOW, curvature = right", TAGS) == {"curvature": "right", "track": UNKNOWN,
                                                            "speed": "slow"}
    assert parse_tags("curvature=sideways track=on track=off", TAGS) == {"curvature": UNKNOWN, "track": "on",
                                                                   "speed": UNKNOWN}
    assert parse_tags("", TAGS) == {k: UNKNOWN for k in TAGS}
    assert parse_tags("Phase=GRASP gripper: closed speed=fast", ARM_TAGS) == {"phase": "grasp", "gripper": "closed"}
    assert parse_tags("phase=left", ARM_TAGS) == {"phase": UNKNOWN, "gripper": UNKNOWN}


def build_tiny_vlm(directory) -> None:
    """A randomly initialised LLaVA (CLIP vision tower + Llama) with a word-level tokenizer, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "=", *TAGS, *(v for vs in TAGS.values() for v in vs)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                  crop_size={"height": 16, "width": 16}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=len(words), pad_token_id=0, bos_token_id=2,
                                eos_token_id=3),
        image_token_index=words.index("<image>"), vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)


def test_hugging_face_vlm_behind_the_same_interface(tmp_path):
    build_tiny_vlm(tmp_path / "vlm")
    vlm = load_reasoner(tmp_path / "vlm", tags=TAGS, events=EVENTS)
    assert isinstance(vlm, HFVisionLanguageReasoner)
    clips = random_clips(preset("tiny"), 3, seed=4)
    out = vlm.describe(clips, ["none", "off_track", "novelty"])
    assert len(out) == 3
    for d, e in zip(out, ["none", "off_track", "novelty"]):
        assert all(d["tags"][k] in (*TAGS[k], UNKNOWN) for k in TAGS)
        assert d["tags"] == parse_tags(d["answer"], TAGS) and d["caption"].endswith(f"event: {e}")
    emb = vlm.embed(clips[:, -1])
    assert emb.shape[0] == 3 and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])  # depends on the image
    clip_emb, described = vlm.describe_and_embed(clips, ["none", "off_track", "novelty"])
    assert [d["tags"] for d in described] == [d["tags"] for d in out]
    per_frame = vlm.embed(clips.reshape(-1, *clips.shape[2:])).reshape(3, clips.shape[1], -1).mean(axis=1)
    np.testing.assert_allclose(clip_emb, per_frame / np.linalg.norm(per_frame, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="unknown events"):
        vlm.describe(clips, ["none", "none", "crash"])
    arm = HFVisionLanguageReasoner(tmp_path / "vlm", tags=ARM_TAGS, events=ARM_EVENTS)  # another world's words
    assert "phase=<reach|grasp|place> gripper=<open|closed>" in arm._prompt("grasp")
    for d in arm.describe(clips, ["none", "grasp", "intervention"], caption_fn=lambda t, e: e):
        assert set(d["tags"]) == set(ARM_TAGS) and all(d["tags"][k] in (*ARM_TAGS[k], UNKNOWN) for k in ARM_TAGS)
        assert d["tags"] == parse_tags(d["answer"], ARM_TAGS)
    with pytest.raises(ValueError, match="unknown events"):
        arm.describe(clips[:1], ["off_track"])
