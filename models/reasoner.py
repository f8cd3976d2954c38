"""Scene reasoner: a clip's frames + its mined event -> structured tags (and a one-line caption).

The design follows the prefix-LM vision-language models (ClipCap, Mokady et al. 2021; LLaVA,
Liu et al. 2023) at toy scale: a small CNN (a 2x space-to-depth, then strided convolutions,
as in ``models.policy``) encodes each of the clip's k frames to one feature vector; a linear
map turns each into one visual prefix token of a transformers ``LlamaForCausalLM`` built from
the config (never downloaded). After the prefix come the event token (the event is mined
upstream and given, not predicted) and the answer "<tag>= <value> ..." over the config's
``tags`` in order, one word-level token per key and per value (``Reasoner.vocab``, built from
the config: the world's vocabulary, not this module's). Training is teacher forcing with
cross-entropy on the value tokens; decoding is greedy, one slot at a time, with each slot's
logits restricted to that tag's valid values, so the answer always parses. ``embed`` returns
the L2-normalised encoder features (clip embeddings for near-duplicate detection and novelty).
The caption is the caller's ``caption_fn(tags, event)`` (a world's ``caption``), else
``default_caption``.

``load_reasoner`` also opens a pretrained Hugging Face vision-language model saved in a local
directory behind the same describe()/embed() interface: ``HFVisionLanguageReasoner``
(``stages.curate_ray`` copies one from an s3:// prefix first).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import checkpoint

WEIGHTS_NAME = checkpoint.WEIGHTS_NAME
CONFIG_NAME = "reasoner_config.json"  # not config.json: that name marks a Hugging Face model
UNKNOWN = "unknown"  # a tag value a describer could not determine
# A placeholder vocabulary of no world (shape-only uses: benchmarks, smoke tests). A world's reasoner
# takes the world's (stages.describe.reasoner_config_for), and a checkpoint carries its own.
DEFAULT_TAGS: Mapping[str, tuple[str, ...]] = {"motion": ("still", "moving")}
DEFAULT_EVENTS = ("none", "intervention", "novelty")
CaptionFn = Callable[[dict, str], str]
_BATCH = 256  # inference chunk


def default_caption(tags: Mapping[str, str], event: str) -> str:
    """The generic caption: "k v, k v; event: e" (a world's ``caption`` is usually passed instead)."""
    return ", ".join(f"{k} {v}" for k, v in tags.items()) + f"; event: {event}"


@dataclass(frozen=True)
class ReasonerConfig:
    """Architecture, vocabulary and training hyper-parameters of the scene reasoner."""

    image_size: int = 64
    frames_per_clip: int = 4  # k frames per clip (stages.describe.clip_frames)
    channels: tuple[int, ...] = (16, 32, 64)  # one stride-2 conv per entry, after a 2x space-to-depth
    embed_dim: int = 64  # encoder feature (and `embed`) width
    d_model: int = 64  # Llama hidden size
    n_layers: int = 2
    n_heads: int = 4
    # training recipe
    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_size: int = 32
    steps: int = 1500  # about 60 s on one CPU core (measured)
    mirror_prob: float = 0.5  # share of training clips flipped left-right (ignored when `mirror` is empty)
    seed: int = 0
    # vocabulary (a world's: stages.describe.reasoner_config_for)
    tags: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_TAGS))  # tag -> values
    events: tuple[str, ...] = DEFAULT_EVENTS  # the event tokens of the prompt
    mirror: dict[str, dict[str, str]] = field(default_factory=dict)  # {tag: {value: value when flipped}}; {} = none

    def __post_init__(self) -> None:
        # JSON gives lists (and any mapping may come in): store tuples and plain dicts
        if isinstance(self.events, str) or any(isinstance(v, str) for v in dict(self.tags).values()):
            raise ValueError("events and each tag's values must be sequences of strings, not one string")
        object.__setattr__(self, "tags", {str(k): tuple(v) for k, v in dict(self.tags).items()})
        object.__setattr__(self, "events", tuple(self.events))
        object.__setattr__(self, "mirror", {str(k): dict(v) for k, v in dict(self.mirror).items()})
        if self.frames_per_clip < 1 or self.n_layers < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("frames_per_clip, n_layers, steps and batch_size must be >= 1")
        if self.image_size % 2 ** (len(self.channels) + 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.channels) + 1}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.mirror_prob <= 1.0:
            raise ValueError(f"mirror_prob must be in [0, 1], got {self.mirror_prob}")
        if not self.tags:
            raise ValueError("need at least one tag")
        if not self.events or len(set(self.events)) != len(self.events):
            raise ValueError(f"events must be distinct and at least one, got {self.events}")
        for key, values in self.tags.items():
            if not values or len(set(values)) != len(values) or UNKNOWN in values:
                raise ValueError(f"tag {key!r}: values {values} must be distinct, at least one, not {UNKNOWN!r}")
        for key, swap in self.mirror.items():
            bad = {k: v for k, v in swap.items() if {k, v} - set(self.tags.get(key, ()))}
            if key not in self.tags or bad:
                raise ValueError(f"mirror {key!r}: {bad or swap} maps outside tags {self.tags.get(key)}")
        vocab = vocabulary(self)
        if len(set(vocab)) != len(vocab):
            raise ValueError(f"tokens {sorted(t for t, n in Counter(vocab).items() if n > 1)} collide")


def vocabulary(config: ReasonerConfig) -> tuple[str, ...]:
    """The token vocabulary of a config: event tokens, then key tokens, then the distinct values."""
    values = dict.fromkeys(v for vs in config.tags.values() for v in vs)
    return (*(f"event:{e}" for e in config.events), *(f"{k}=" for k in config.tags), *values)


_DEFAULT = ReasonerConfig()
_TINY = dataclasses.replace(_DEFAULT, image_size=32, channels=(8, 16), embed_dim=32, d_model=32, n_heads=2,
                            steps=400, lr=3e-3)
_GPU = dataclasses.replace(_DEFAULT, frames_per_clip=8, channels=(32, 64, 128), embed_dim=256, d_model=256,
                           n_layers=4, n_heads=8, batch_size=256, lr=1e-3, steps=20_000)
PRESETS = {"tiny": _TINY, "default": _DEFAULT, "gpu": _GPU}


def preset(name: str) -> ReasonerConfig:
    """Named config (the default vocabulary): "tiny" (tests), "default" (CPU demo), "gpu"."""
    return checkpoint.preset(PRESETS, name, "reasoner")


def config_from_dict(d: dict) -> ReasonerConfig:
    """A config from its JSON form (lists back to tuples, the tag values too; unknown keys are an error)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(ReasonerConfig)}
    if unknown:
        raise ValueError(f"unknown ReasonerConfig fields: {sorted(unknown)}")
    return ReasonerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _check_events(events: Sequence[str], n: int, valid: Sequence[str]) -> None:
    if len(events) != n:
        raise ValueError(f"{n} clips but {len(events)} events")
    bad = sorted({e for e in events if e not in valid})
    if bad:
        raise ValueError(f"unknown events {bad}; valid: {tuple(valid)}")


class Reasoner(nn.Module):
    """CNN frame encoder + Llama decoder over ``self.vocab`` (see the module docstring)."""

    def __init__(self, config: ReasonerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vocab = vocabulary(c)
        self.token_id = {tok: i for i, tok in enumerate(self.vocab)}
        blocks, c_in = [nn.PixelUnshuffle(2)], 4 * 3
        for c_out in c.channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c_out
        side = c.image_size // 2 ** (len(c.channels) + 1)
        self.encoder = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(c_in * side * side, c.embed_dim))
        self.to_prefix = nn.Sequential(nn.SiLU(), nn.Linear(c.embed_dim, c.d_model))
        from transformers import LlamaConfig, LlamaForCausalLM  # here: reading a config never pays the import

        self.lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(self.vocab), hidden_size=c.d_model, intermediate_size=4 * c.d_model,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
            max_position_embeddings=c.frames_per_clip + 1 + 2 * len(c.tags), tie_word_embeddings=False,
            pad_token_id=None, bos_token_id=None, eos_token_id=None, use_cache=False))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _event_ids(self, events: Sequence[str], n: int) -> torch.Tensor:
        _check_events(events, n, self.config.events)
        return torch.tensor([self.token_id[f"event:{e}"] for e in events])

    def _value_ids(self, tags: list[dict[str, str]]) -> torch.Tensor:
        """[N, len(tags)] token ids of the tag values; a missing or invalid value is an error."""
        vocab = self.config.tags
        for t in tags:
            for key, values in vocab.items():
                if t.get(key) not in values:
                    raise ValueError(f"tag {key}={t.get(key)!r} is not one of {values}")
        return torch.tensor([[self.token_id[t[k]] for k in vocab] for t in tags], dtype=torch.long).reshape(
            -1, len(vocab))

    def _frames(self, frames: np.ndarray, lead: int) -> torch.Tensor:
        """Checked uint8 frames [..., S, S, 3] (lead axes before H) -> float [n, 3, S, S] in [-1, 1]."""
        c = self.config
        frames = np.asarray(frames)
        tail = (c.frames_per_clip,) * (lead - 1) + (c.image_size, c.image_size, 3)
        if frames.dtype != np.uint8 or frames.ndim != lead + 3 or frames.shape[1:] != tail:
            lead_text = ", ".join(["N"] + [str(c.frames_per_clip)] * (lead - 1))
            raise ValueError(f"frames must be uint8[{lead_text}, {c.image_size}, {c.image_size}, 3], "
                             f"got {frames.dtype}{list(frames.shape)}")
        pixels = np.ascontiguousarray(frames).reshape(-1, c.image_size, c.image_size, 3)
        x = np.empty(pixels.shape, np.float32)  # NumPy converts uint8 2-6x faster than torch on CPU
        np.divide(pixels, np.float32(127.5), out=x)
        x -= np.float32(1.0)
        return torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2)

    def _features(self, clips_NKHWC: np.ndarray) -> torch.Tensor:
        """Encoder features [N, k, embed_dim] of each clip's frames."""
        x = self._frames(clips_NKHWC, lead=2)
        return self.encoder(x).view(len(clips_NKHWC), self.config.frames_per_clip, -1)

    def _prefix(self, features_NKE: torch.Tensor, event_ids_N: torch.Tensor) -> torch.Tensor:
        """Input embeddings of the prompt: k visual tokens then the event token -> [N, k+1, D]."""
        words = self.lm.get_input_embeddings()(event_ids_N.to(self.device))[:, None]
        return torch.cat([self.to_prefix(features_NKE), words], dim=1)

    def _key_embeds(self, key: str, n: int) -> torch.Tensor:
        return self.lm.get_input_embeddings()(torch.full((n, 1), self.token_id[f"{key}="], device=self.device))

    def loss(self, clips_NKHWC: np.ndarray, events: list[str], tags: list[dict[str, str]]) -> torch.Tensor:
        """Teacher-forced cross-entropy (full vocabulary) on the value tokens of the answer."""
        n = len(clips_NKHWC)
        values = self._value_ids(tags).to(self.device)
        if len(values) != n:
            raise ValueError(f"{n} clips but {len(values)} tag dicts")
        prefix = self._prefix(self._features(clips_NKHWC), self._event_ids(events, n))
        embed = self.lm.get_input_embeddings()
        answer = [t for i, key in enumerate(self.config.tags)
                  for t in (self._key_embeds(key, n), embed(values[:, i:i + 1]))]
        logits = self.lm(inputs_embeds=torch.cat([prefix, *answer], dim=1)).logits
        key_pos = prefix.shape[1] + 2 * torch.arange(len(self.config.tags), device=self.device)  # key -> value
        return F.cross_entropy(logits[:, key_pos].reshape(-1, len(self.vocab)), values.reshape(-1))

    @torch.no_grad()
    def _predict(self, features_NKE: torch.Tensor, events: list[str]) -> list[dict[str, str]]:
        """Greedy constrained decoding of the tag values (eval mode is the caller's business)."""
        n = len(features_NKE)
        seq = self._prefix(features_NKE, self._event_ids(events, n))
        embed = self.lm.get_input_embeddings()
        picked: dict[str, list[str]] = {}
        for key, values in self.config.tags.items():
            seq = torch.cat([seq, self._key_embeds(key, n)], dim=1)
            allowed = torch.tensor([self.token_id[v] for v in values], device=self.device)
            choice = allowed[self.lm(inputs_embeds=seq).logits[:, -1, allowed].argmax(-1)]
            seq = torch.cat([seq, embed(choice[:, None])], dim=1)
            picked[key] = [self.vocab[i] for i in choice.tolist()]
        return [{key: picked[key][i] for key in self.config.tags} for i in range(n)]

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def describe(self, clips_NKHWC: np.ndarray, events: list[str], *,
                 caption_fn: CaptionFn | None = None) -> list[dict]:
        """[{"tags": {tag: value}, "caption": str}] per clip of uint8[N, k, S, S, 3] and its event;
        the caption is ``caption_fn(tags, event)`` (default: ``default_caption``)."""
        return self.describe_and_embed(clips_NKHWC, events, caption_fn=caption_fn)[1]

    @torch.no_grad()
    def describe_and_embed(self, clips_NKHWC: np.ndarray, events: list[str], *,
                           caption_fn: CaptionFn | None = None) -> tuple[np.ndarray, list[dict]]:
        """``describe``, and each clip's embedding float32[N, embed_dim]: the mean of its frames'
        ``embed`` vectors, L2-normalised again. One encoder pass serves both."""
        if len(clips_NKHWC) != len(events):
            raise ValueError(f"{len(clips_NKHWC)} clips but {len(events)} events")
        caption_fn = caption_fn or default_caption
        tags, vectors = [], []
        with self._eval():
            for i in range(0, len(clips_NKHWC), _BATCH):
                features = self._features(clips_NKHWC[i:i + _BATCH])
                tags += self._predict(features, list(events[i:i + _BATCH]))
                vectors.append(F.normalize(F.normalize(features, dim=-1).mean(dim=1), dim=-1))
        emb = torch.cat(vectors).cpu().numpy() if vectors else np.zeros((0, self.config.embed_dim))
        return emb.astype(np.float32), [{"tags": t, "caption": caption_fn(t, e)} for t, e in zip(tags, events)]

    @torch.no_grad()
    def embed(self, frames_NHWC: np.ndarray) -> np.ndarray:
        """L2-normalised encoder features float32[N, embed_dim] of uint8 frames [N, S, S, 3]."""
        with self._eval():
            out = [F.normalize(self.encoder(self._frames(frames_NHWC[i:i + _BATCH], lead=1)), dim=-1)
                   for i in range(0, len(frames_NHWC), _BATCH)]
        return (torch.cat(out).cpu().numpy() if out else np.zeros((0, self.config.embed_dim))).astype(np.float32)


def _mirror(clips_NKHWC: np.ndarray, tags: list[dict[str, str]], flip_N: np.ndarray,
            mirror: Mapping[str, Mapping[str, str]]) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Mirror augmentation: flipped clips (width axis) get their tags mapped by ``mirror``
    ({tag: {value: mirrored value}}; values not listed stay)."""
    clips = clips_NKHWC.copy()
    clips[flip_N] = clips[flip_N, :, :, ::-1]
    tags = [{k: mirror.get(k, {}).get(v, v) for k, v in t.items()} if f else t for t, f in zip(tags, flip_N)]
    return clips, tags


def _accuracy(pred: list[dict[str, str]], true: list[dict[str, str]], keys: Sequence[str]) -> dict:
    """Per-tag and all-tags-correct accuracy of `pred`, and of the majority class of `true` itself
    (the best constant answer on these clips, an upper bound of any train-set majority)."""
    n = len(true)
    out: dict = {"n": n, "accuracy": {}, "majority_class": {}, "majority_accuracy": {}}
    for key in keys:
        out["accuracy"][key] = sum(p[key] == t[key] for p, t in zip(pred, true)) / n
        value, count = Counter(t[key] for t in true).most_common(1)[0]
        out["majority_class"][key], out["majority_accuracy"][key] = value, count / n
    out["all_correct"] = sum(all(p[k] == t[k] for k in keys) for p, t in zip(pred, true)) / n
    out["majority_all_correct"] = Counter(tuple(t[k] for k in keys) for t in true).most_common(1)[0][1] / n
    return out


def train_reasoner(train_clips: np.ndarray, train_events: list[str], train_tags: list[dict[str, str]], *,
                   config: ReasonerConfig, val_clips: np.ndarray | None = None,
                   val_events: list[str] | None = None,
                   val_tags: list[dict[str, str]] | None = None, device: str = "cpu") -> tuple[Reasoner, dict]:
    """Train from scratch on ``device`` (AdamW, `config.steps` batches sampled with replacement, seeded).

    The vocabulary (tags, events, mirror map) is the config's. Returns the model in eval mode and
    metrics: train_seconds, steps, n_train, final_loss (mean of the last 20 steps), and with
    validation clips "val" = {n, accuracy{tag}, all_correct, majority_class{tag},
    majority_accuracy{tag}, majority_all_correct}.
    """
    n = len(train_clips)
    if n == 0 or len(train_events) != n or len(train_tags) != n:
        raise ValueError(f"need as many events and tag dicts as train clips (>0), got {n}, "
                         f"{len(train_events)}, {len(train_tags)}")
    if (val_clips is None) != (val_tags is None) or (val_clips is None) != (val_events is None):
        raise ValueError("give val_clips, val_events and val_tags together")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = Reasoner(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    events, losses = np.asarray(train_events), []
    start = time.perf_counter()
    for _ in range(config.steps):
        idx = rng.integers(0, n, min(config.batch_size, n))
        flip = (rng.random(len(idx)) < config.mirror_prob) & bool(config.mirror)  # drawn either way: same stream
        clips, tags = _mirror(train_clips[idx], [train_tags[i] for i in idx], flip, config.mirror)
        loss = model.loss(clips, list(events[idx]), tags)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    metrics: dict = {"train_seconds": time.perf_counter() - start, "steps": config.steps, "n_train": n,
                     "final_loss": float(np.mean(losses[-20:]))}
    model.eval()
    if val_clips is not None:
        pred = [d["tags"] for d in model.describe(val_clips, val_events)]
        metrics["val"] = _accuracy(pred, val_tags, list(config.tags))
    return model, metrics


# ---- checkpoints --------------------------------------------------------------------------------


def save(model: Reasoner, directory: str | os.PathLike) -> str:
    """Write model.safetensors + reasoner_config.json to a local directory; returns it."""
    return checkpoint.save(model, directory, config_name=CONFIG_NAME)


def load(directory: str | os.PathLike, *, device: str = "cpu") -> Reasoner:
    """Load a reasoner written by `save` from a local directory, in eval mode."""
    return checkpoint.load(Reasoner, config_from_dict, directory, device=device, config_name=CONFIG_NAME,
                           what="reasoner")


def load_reasoner(directory: str | os.PathLike, *, device: str = "cpu", tags: dict | None = None,
                  events: tuple[str, ...] | None = None, source: str | os.PathLike | None = None
                  ) -> Reasoner | HFVisionLanguageReasoner:
    """Our checkpoint when the local directory holds reasoner_config.json (its vocabulary is in its
    config); else a Hugging Face vision-language model (config.json plus processor_config.json or
    preprocessor_config.json) as `HFVisionLanguageReasoner`, asked for ``tags`` and told
    ``events``; else ValueError, naming ``source`` (where the directory was copied from, say an
    s3:// URI) when given. Never downloads."""
    local = Path(directory)
    if (local / CONFIG_NAME).is_file():
        return load(local, device=device)
    processor_files = ("processor_config.json", "preprocessor_config.json")
    if (local / "config.json").is_file() and any((local / f).is_file() for f in processor_files):
        return HFVisionLanguageReasoner(local, device=device, tags=tags, events=events)
    raise ValueError(f"{directory if source is None else source} holds neither a reasoner checkpoint "
                     f"({CONFIG_NAME}) nor a Hugging Face vision-language model (config.json + processor files)")


# ---- pretrained vision-language models ----------------------------------------------------------

PROMPT = ("You see one camera frame of the scene. The event mined from the log is: {event}. "
          "Answer on one line exactly as: {answer_format}")


def parse_tags(text: str, tags: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Tags of the vocabulary ``tags`` (default ``DEFAULT_TAGS``) from a "key=value" answer ("key: value"
    and spaces around "=" also parse; case-insensitive). The first occurrence of each key counts; a
    key that is absent or whose value is not one of ``tags[key]`` reads "unknown"."""
    vocab = dict(DEFAULT_TAGS if tags is None else tags)
    keys = {k.lower(): k for k in vocab}
    pair = re.compile(r"\b(" + "|".join(map(re.escape, vocab)) + r")\s*[=:]\s*([\w-]+)", re.IGNORECASE)
    out = {key: UNKNOWN for key in vocab}
    seen: set[str] = set()
    for key, value in pair.findall(text):
        key = keys[key.lower()]
        if key not in seen:
            seen.add(key)
            out[key] = {v.lower(): v for v in vocab[key]}.get(value.lower(), UNKNOWN)
    return out


class HFVisionLanguageReasoner:
    """A pretrained Hugging Face image-text-to-text model behind the reasoner interface.

    Loads ``AutoProcessor`` and ``AutoModelForImageTextToText`` from a local directory with
    local_files_only=True. ``describe`` shows the model the last frame of each clip with
    ``prompt`` (``{event}`` and ``{answer_format}`` filled in; through the processor's chat
    template), decodes greedily and parses the answer with ``parse_tags`` over ``tags`` (the
    world's vocabulary; default ``DEFAULT_TAGS``); ``events`` are the valid events (default
    ``DEFAULT_EVENTS``). ``embed`` is the mean over image tokens of ``get_image_features``
    (the vision tower through the multimodal projector), L2-normalised.
    """

    def __init__(self, directory: str | os.PathLike, *, device: str = "cpu", max_new_tokens: int = 32,
                 tags: Mapping[str, Sequence[str]] | None = None, events: Sequence[str] | None = None,
                 prompt: str = PROMPT) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.tags = {str(k): tuple(v) for k, v in (DEFAULT_TAGS if tags is None else tags).items()}
        self.events = tuple(DEFAULT_EVENTS if events is None else events)
        self.prompt = prompt
        self.processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
        self.model = AutoModelForImageTextToText.from_pretrained(str(directory), local_files_only=True)
        self.model = self.model.to(device).eval()
        self.max_new_tokens = max_new_tokens

    def _prompt(self, event: str) -> str:
        answer = " ".join(f"{key}=<{'|'.join(values)}>" for key, values in self.tags.items())  # k=<v1|v2> ..
        text = self.prompt.format(event=event, answer_format=answer)
        content = [{"type": "image"}, {"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def describe(self, clips_NKHWC: np.ndarray, events: list[str], *,
                 caption_fn: CaptionFn | None = None) -> list[dict]:
        """[{"tags", "caption", "answer"}] per clip (uint8[N, k, H, W, 3]); "answer" is the raw text,
        the caption ``caption_fn(tags, event)`` (default: ``default_caption``)."""
        clips = np.asarray(clips_NKHWC)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"clips must be uint8[N, k, H, W, 3], got {clips.dtype}{list(clips.shape)}")
        _check_events(list(events), len(clips), self.events)
        caption_fn = caption_fn or default_caption
        out = []
        for i in range(0, len(clips), _BATCH):
            batch_events = list(events[i:i + _BATCH])
            inputs = self.processor(images=list(clips[i:i + _BATCH, -1]),
                                    text=[self._prompt(e) for e in batch_events],
                                    return_tensors="pt", padding=True).to(self.model.device)
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            answers = self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for answer, event in zip(answers, batch_events):
                tags = parse_tags(answer, self.tags)
                out.append({"tags": tags, "caption": caption_fn(tags, event), "answer": answer.strip()})
        return out

    def describe_and_embed(self, clips_NKHWC: np.ndarray, events: list[str], *,
                           caption_fn: CaptionFn | None = None) -> tuple[np.ndarray, list[dict]]:
        """``describe``, and each clip's embedding: the mean of its frames' ``embed``, L2-normalised."""
        clips = np.asarray(clips_NKHWC)
        described = self.describe(clips, events, caption_fn=caption_fn)
        n, k = clips.shape[:2]
        emb = self.embed(clips.reshape(n * k, *clips.shape[2:])).reshape(n, k, -1).mean(axis=1)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12), described

    @torch.no_grad()
    def embed(self, frames_NHWC: np.ndarray) -> np.ndarray:
        """L2-normalised mean image features float32[N, D] of uint8 frames [N, H, W, 3]."""
        frames = np.asarray(frames_NHWC)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8[N, H, W, 3], got {frames.dtype}{list(frames.shape)}")
        inputs = self.processor.image_processor(list(frames), return_tensors="pt").to(self.model.device)
        feats = self.model.get_image_features(**inputs)
        feats = getattr(feats, "pooler_output", feats)  # transformers 5: an output object
        if isinstance(feats, (list, tuple)):
            vec = torch.stack([f.reshape(-1, f.shape[-1]).float().mean(0) for f in feats])
        else:
            vec = feats.reshape(len(frames), -1, feats.shape[-1]).float().mean(1)
        return F.normalize(vec, dim=-1).cpu().numpy().astype(np.float32)
