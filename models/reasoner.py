"""Scene reasoner: a clip's frames + its mined event -> structured tags and a one-line caption.

The design follows the prefix-LM vision-language models (ClipCap, Mokady et al. 2021; LLaVA,
Liu et al. 2023) at toy scale: a small CNN (a 2x space-to-depth, then strided convolutions,
as in ``models.policy``) encodes each of the clip's k frames to one feature vector; a linear
map turns each into one visual prefix token of a transformers ``LlamaForCausalLM`` built from
the config (never downloaded). After the prefix come the event token (the event is mined
upstream and given, not predicted) and the answer "curvature= <v> track= <v> speed= <v>",
one word-level token per key and per value (vocabulary: ``VOCAB``). Training is teacher
forcing with cross-entropy on the three value tokens; decoding is greedy, one slot at a time,
with each slot's logits restricted to that tag's valid values, so the answer always parses.
``embed`` returns the L2-normalised encoder features (clip embeddings for near-duplicate
detection and novelty).

``load_reasoner`` also opens a pretrained Hugging Face vision-language model saved in a local
directory (or s3:// prefix) behind the same describe()/embed() interface:
``HFVisionLanguageReasoner``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from stages.describe import EVENTS, TAGS, UNKNOWN, caption

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "reasoner_config.json"  # not config.json: that name marks a Hugging Face model
KEY_TOKENS = tuple(f"{key}=" for key in TAGS)
EVENT_TOKENS = tuple(f"event:{e}" for e in EVENTS)
VALUE_TOKENS = tuple(dict.fromkeys(v for values in TAGS.values() for v in values))
VOCAB = EVENT_TOKENS + KEY_TOKENS + VALUE_TOKENS
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
_BATCH = 256  # inference chunk


@dataclass(frozen=True)
class ReasonerConfig:
    """Architecture and training hyper-parameters of the scene reasoner."""

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
    mirror_prob: float = 0.5  # share of training clips flipped left-right, curvature left<->right swapped
    seed: int = 0

    def __post_init__(self) -> None:
        if self.frames_per_clip < 1 or self.n_layers < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("frames_per_clip, n_layers, steps and batch_size must be >= 1")
        if self.image_size % 2 ** (len(self.channels) + 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{len(self.channels) + 1}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads}")


_DEFAULT = ReasonerConfig()
_TINY = dataclasses.replace(_DEFAULT, image_size=32, channels=(8, 16), embed_dim=32, d_model=32, n_heads=2,
                            steps=400, lr=3e-3)
_GPU = dataclasses.replace(_DEFAULT, frames_per_clip=8, channels=(32, 64, 128), embed_dim=256, d_model=256,
                           n_layers=4, n_heads=8, batch_size=256, lr=1e-3, steps=20_000)
PRESETS = {"tiny": _TINY, "default": _DEFAULT, "gpu": _GPU}


def preset(name: str) -> ReasonerConfig:
    """Named config: "tiny" (tests), "default" (CPU demo), "gpu"."""
    if name not in PRESETS:
        raise ValueError(f"unknown reasoner preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def config_from_dict(d: dict) -> ReasonerConfig:
    """Rebuild a config from its JSON form (lists back to tuples; unknown keys are an error)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(ReasonerConfig)}
    if unknown:
        raise ValueError(f"unknown ReasonerConfig fields: {sorted(unknown)}")
    return ReasonerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _event_ids(events: list[str], n: int) -> torch.Tensor:
    if len(events) != n:
        raise ValueError(f"{n} clips but {len(events)} events")
    bad = sorted({e for e in events if e not in EVENTS})
    if bad:
        raise ValueError(f"unknown events {bad}; valid: {EVENTS}")
    return torch.tensor([TOKEN_ID[f"event:{e}"] for e in events])


def _value_ids(tags: list[dict[str, str]]) -> torch.Tensor:
    """[N, len(TAGS)] token ids of the tag values; a missing or invalid value is an error."""
    rows = []
    for t in tags:
        for key, values in TAGS.items():
            if t.get(key) not in values:
                raise ValueError(f"tag {key}={t.get(key)!r} is not one of {values}")
        rows.append([TOKEN_ID[t[key]] for key in TAGS])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, len(TAGS))


class Reasoner(nn.Module):
    """CNN frame encoder + Llama decoder over ``VOCAB`` (see the module docstring)."""

    def __init__(self, config: ReasonerConfig) -> None:
        super().__init__()
        self.config = c = config
        blocks, c_in = [nn.PixelUnshuffle(2)], 4 * 3
        for c_out in c.channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c_out
        side = c.image_size // 2 ** (len(c.channels) + 1)
        self.encoder = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(c_in * side * side, c.embed_dim))
        self.to_prefix = nn.Sequential(nn.SiLU(), nn.Linear(c.embed_dim, c.d_model))
        self.lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(VOCAB), hidden_size=c.d_model, intermediate_size=4 * c.d_model,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
            max_position_embeddings=c.frames_per_clip + 1 + 2 * len(TAGS), tie_word_embeddings=False,
            pad_token_id=None, bos_token_id=None, eos_token_id=None, use_cache=False))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

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
        return self.lm.get_input_embeddings()(torch.full((n, 1), TOKEN_ID[key], device=self.device))

    def loss(self, clips_NKHWC: np.ndarray, events: list[str], tags: list[dict[str, str]]) -> torch.Tensor:
        """Teacher-forced cross-entropy (full vocabulary) on the value tokens of the answer."""
        n = len(clips_NKHWC)
        values = _value_ids(tags).to(self.device)
        if len(values) != n:
            raise ValueError(f"{n} clips but {len(values)} tag dicts")
        prefix = self._prefix(self._features(clips_NKHWC), _event_ids(events, n))
        embed = self.lm.get_input_embeddings()
        answer = [t for i, key in enumerate(KEY_TOKENS) for t in (self._key_embeds(key, n), embed(values[:, i:i + 1]))]
        logits = self.lm(inputs_embeds=torch.cat([prefix, *answer], dim=1)).logits
        key_pos = prefix.shape[1] + 2 * torch.arange(len(TAGS), device=self.device)  # each key predicts its value
        return F.cross_entropy(logits[:, key_pos].reshape(-1, len(VOCAB)), values.reshape(-1))

    @torch.no_grad()
    def _predict(self, features_NKE: torch.Tensor, events: list[str]) -> list[dict[str, str]]:
        """Greedy constrained decoding of the tag values (eval mode is the caller's business)."""
        n = len(features_NKE)
        seq = self._prefix(features_NKE, _event_ids(events, n))
        embed = self.lm.get_input_embeddings()
        picked: dict[str, list[str]] = {}
        for key, token in zip(TAGS, KEY_TOKENS):
            seq = torch.cat([seq, self._key_embeds(token, n)], dim=1)
            allowed = torch.tensor([TOKEN_ID[v] for v in TAGS[key]], device=self.device)
            choice = allowed[self.lm(inputs_embeds=seq).logits[:, -1, allowed].argmax(-1)]
            seq = torch.cat([seq, embed(choice[:, None])], dim=1)
            picked[key] = [VOCAB[i] for i in choice.tolist()]
        return [{key: picked[key][i] for key in TAGS} for i in range(n)]

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def describe(self, clips_NKHWC: np.ndarray, events: list[str]) -> list[dict]:
        """[{"tags": {tag: value}, "caption": str}] per clip of uint8[N, k, S, S, 3] and its event."""
        return self.describe_and_embed(clips_NKHWC, events)[1]

    @torch.no_grad()
    def describe_and_embed(self, clips_NKHWC: np.ndarray, events: list[str]) -> tuple[np.ndarray, list[dict]]:
        """``describe``, and each clip's embedding float32[N, embed_dim]: the mean of its frames'
        ``embed`` vectors, L2-normalised again. One encoder pass serves both."""
        if len(clips_NKHWC) != len(events):
            raise ValueError(f"{len(clips_NKHWC)} clips but {len(events)} events")
        tags, vectors = [], []
        with self._eval():
            for i in range(0, len(clips_NKHWC), _BATCH):
                features = self._features(clips_NKHWC[i:i + _BATCH])
                tags += self._predict(features, list(events[i:i + _BATCH]))
                vectors.append(F.normalize(F.normalize(features, dim=-1).mean(dim=1), dim=-1))
        emb = torch.cat(vectors).cpu().numpy() if vectors else np.zeros((0, self.config.embed_dim))
        return emb.astype(np.float32), [{"tags": t, "caption": caption(t, e)} for t, e in zip(tags, events)]

    @torch.no_grad()
    def embed(self, frames_NHWC: np.ndarray) -> np.ndarray:
        """L2-normalised encoder features float32[N, embed_dim] of uint8 frames [N, S, S, 3]."""
        with self._eval():
            out = [F.normalize(self.encoder(self._frames(frames_NHWC[i:i + _BATCH], lead=1)), dim=-1)
                   for i in range(0, len(frames_NHWC), _BATCH)]
        return (torch.cat(out).cpu().numpy() if out else np.zeros((0, self.config.embed_dim))).astype(np.float32)


_MIRRORED = {"left": "right", "right": "left"}


def _mirror(clips_NKHWC: np.ndarray, tags: list[dict[str, str]],
            flip_N: np.ndarray) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Mirror augmentation: flipped clips (width axis) get curvature left <-> right swapped."""
    clips = clips_NKHWC.copy()
    clips[flip_N] = clips[flip_N, :, :, ::-1]
    tags = [{**t, "curvature": _MIRRORED.get(t["curvature"], t["curvature"])} if f else t
            for t, f in zip(tags, flip_N)]
    return clips, tags


def _accuracy(pred: list[dict[str, str]], true: list[dict[str, str]]) -> dict:
    """Per-tag and all-tags-correct accuracy of `pred`, and of the majority class of `true` itself
    (the best constant answer on these clips, an upper bound of any train-set majority)."""
    n = len(true)
    out: dict = {"n": n, "accuracy": {}, "majority_class": {}, "majority_accuracy": {}}
    for key in TAGS:
        out["accuracy"][key] = sum(p[key] == t[key] for p, t in zip(pred, true)) / n
        value, count = Counter(t[key] for t in true).most_common(1)[0]
        out["majority_class"][key], out["majority_accuracy"][key] = value, count / n
    out["all_correct"] = sum(all(p[k] == t[k] for k in TAGS) for p, t in zip(pred, true)) / n
    out["majority_all_correct"] = Counter(tuple(t[k] for k in TAGS) for t in true).most_common(1)[0][1] / n
    return out


def train_reasoner(train_clips: np.ndarray, train_events: list[str], train_tags: list[dict[str, str]], *,
                   config: ReasonerConfig, val_clips: np.ndarray | None = None,
                   val_events: list[str] | None = None,
                   val_tags: list[dict[str, str]] | None = None, device: str = "cpu") -> tuple[Reasoner, dict]:
    """Train from scratch on ``device`` (AdamW, `config.steps` batches sampled with replacement, seeded).

    Returns the model in eval mode and metrics: train_seconds, steps, n_train, final_loss
    (mean of the last 20 steps), and with validation clips "val" = {n, accuracy{tag},
    all_correct, majority_class{tag}, majority_accuracy{tag}, majority_all_correct}.
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
        clips, tags = _mirror(train_clips[idx], [train_tags[i] for i in idx],
                              rng.random(len(idx)) < config.mirror_prob)
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
        metrics["val"] = _accuracy(pred, val_tags)
    return model, metrics


# ---- checkpoints --------------------------------------------------------------------------------


@contextlib.contextmanager
def _local_copy(uri: str | os.PathLike, storage_options: dict | None) -> Iterator[Path]:
    """The directory at `uri` as a local path (an s3:// prefix is copied to a temp dir first)."""
    import pyarrow.fs as pafs

    from stages.storage import pyarrow_fs

    fs, path = pyarrow_fs(str(uri), storage_options)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def save(model: Reasoner, uri: str | os.PathLike, *, storage_options: dict | None = None) -> str:
    """Write model.safetensors + reasoner_config.json to a local dir or an s3:// prefix; returns it."""
    import pyarrow.fs as pafs

    from stages.storage import pyarrow_fs

    fs, path = pyarrow_fs(str(uri), storage_options)
    remote = not isinstance(fs, pafs.LocalFileSystem)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if remote else Path(path)
        local.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(local / WEIGHTS_NAME))
        (local / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
        if remote:
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return str(uri)


def _load_ours(local: Path, device: str) -> Reasoner:
    model = Reasoner(config_from_dict(json.loads((local / CONFIG_NAME).read_text())))
    model.load_state_dict(load_file(str(local / WEIGHTS_NAME)))
    return model.to(device).eval()


def load(uri: str | os.PathLike, *, storage_options: dict | None = None, device: str = "cpu") -> Reasoner:
    """Load a reasoner written by `save` (local dir or s3:// prefix), in eval mode."""
    with _local_copy(uri, storage_options) as local:
        if not (local / CONFIG_NAME).is_file() or not (local / WEIGHTS_NAME).is_file():
            raise ValueError(f"{uri} is not a reasoner checkpoint (needs {WEIGHTS_NAME} and {CONFIG_NAME})")
        return _load_ours(local, device)


def load_reasoner(uri: str | os.PathLike, *, storage_options: dict | None = None,
                  device: str = "cpu") -> Reasoner | HFVisionLanguageReasoner:
    """Our checkpoint when the directory holds reasoner_config.json; else a Hugging Face
    vision-language model (config.json plus processor_config.json or preprocessor_config.json)
    as `HFVisionLanguageReasoner`; else ValueError. Never downloads."""
    with _local_copy(uri, storage_options) as local:
        if (local / CONFIG_NAME).is_file():
            return _load_ours(local, device)
        processor_files = ("processor_config.json", "preprocessor_config.json")
        if (local / "config.json").is_file() and any((local / f).is_file() for f in processor_files):
            return HFVisionLanguageReasoner(local, device=device)
    raise ValueError(f"{uri} holds neither a reasoner checkpoint ({CONFIG_NAME}) nor a Hugging Face "
                     "vision-language model (config.json + processor files)")


# ---- pretrained vision-language models ----------------------------------------------------------

_ANSWER_FORMAT = " ".join(f"{key}=<{'|'.join(values)}>" for key, values in TAGS.items())
PROMPT = ("You see the road ahead of a car, from its front camera. The event mined from the log is: "
          "{event}. Answer on one line exactly as: " + _ANSWER_FORMAT)
_PAIR = re.compile(r"\b(" + "|".join(TAGS) + r")\s*[=:]\s*([A-Za-z_]+)", re.IGNORECASE)


def parse_tags(text: str) -> dict[str, str]:
    """Tags from a "key=value" answer ("key: value" and spaces around "=" also parse; case-insensitive).

    The first occurrence of each key counts; a key that is absent or whose value is not one
    of ``TAGS[key]`` reads "unknown".
    """
    tags = {key: UNKNOWN for key in TAGS}
    seen: set[str] = set()
    for key, value in _PAIR.findall(text):
        key, value = key.lower(), value.lower()
        if key not in seen:
            seen.add(key)
            tags[key] = value if value in TAGS[key] else UNKNOWN
    return tags


class HFVisionLanguageReasoner:
    """A pretrained Hugging Face image-text-to-text model behind the reasoner interface.

    Loads ``AutoProcessor`` and ``AutoModelForImageTextToText`` from a local directory with
    local_files_only=True. ``describe`` shows the model the last frame of each clip with
    ``PROMPT`` (through the processor's chat template), decodes greedily and parses the answer
    with ``parse_tags``. ``embed`` is the mean over image tokens of ``get_image_features``
    (the vision tower through the multimodal projector), L2-normalised.
    """

    def __init__(self, directory: str | os.PathLike, *, device: str = "cpu", max_new_tokens: int = 32) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
        self.model = AutoModelForImageTextToText.from_pretrained(str(directory), local_files_only=True)
        self.model = self.model.to(device).eval()
        self.max_new_tokens = max_new_tokens

    def _prompt(self, event: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": PROMPT.format(event=event)}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def describe(self, clips_NKHWC: np.ndarray, events: list[str]) -> list[dict]:
        """[{"tags", "caption", "answer"}] per clip (uint8[N, k, H, W, 3]); "answer" is the raw text."""
        clips = np.asarray(clips_NKHWC)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"clips must be uint8[N, k, H, W, 3], got {clips.dtype}{list(clips.shape)}")
        _event_ids(list(events), len(clips))
        out = []
        for i in range(0, len(clips), _BATCH):
            batch_events = list(events[i:i + _BATCH])
            inputs = self.processor(images=list(clips[i:i + _BATCH, -1]),
                                    text=[self._prompt(e) for e in batch_events],
                                    return_tensors="pt", padding=True).to(self.model.device)
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            answers = self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for answer, event in zip(answers, batch_events):
                tags = parse_tags(answer)
                out.append({"tags": tags, "caption": caption(tags, event), "answer": answer.strip()})
        return out

    def describe_and_embed(self, clips_NKHWC: np.ndarray, events: list[str]) -> tuple[np.ndarray, list[dict]]:
        """``describe``, and each clip's embedding: the mean of its frames' ``embed``, L2-normalised."""
        clips = np.asarray(clips_NKHWC)
        described = self.describe(clips, events)
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
