"""Training-step throughput of each model at a preset on one device (samples/s), no data loading.

    .venv/bin/python -m benchmarks.bench_train_step --preset default --device cpu
    python -m benchmarks.bench_train_step --preset gpu --device cuda

For the policy, the world model and the scene reasoner: the preset's model and batch size on
random uint8 frames (the shapes training uses), ``--warmup`` AdamW steps, then ``--steps`` timed
steps (forward, backward, optimizer), synchronised on CUDA. It measures the model's compute only:
batches are built once on the device, so the sampler and Ray Train are not in it. Stdout: one
line per model, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from time import perf_counter

import numpy as np
import torch

from models import policy, reasoner, world_model


def _policy(preset: str, device: str):
    cfg = policy.preset(preset)
    model = policy.Policy(cfg).to(device)
    frames = torch.randint(0, 256, (cfg.batch_size, cfg.history, cfg.image_size, cfg.image_size, 3),
                           dtype=torch.uint8, device=device)
    target = torch.rand(cfg.batch_size, 3, device=device)
    return model, cfg.batch_size, lambda: model.loss(frames, target)


def _world_model(preset: str, device: str):
    cfg = world_model.preset(preset)
    model = world_model.WorldModel(cfg).to(device)
    b, s = cfg.batch_size, cfg.image_size
    history = torch.randint(0, 256, (b, cfg.history, s, s, 3), dtype=torch.uint8, device=device)
    nxt = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, device=device)
    action = torch.rand(b, 3, device=device)
    return model, b, lambda: model.loss(history, action, nxt)


def _reasoner(preset: str, device: str):
    cfg = reasoner.preset(preset)
    model = reasoner.Reasoner(cfg).to(device)
    b, k, s = cfg.batch_size, cfg.frames_per_clip, cfg.image_size
    clips = np.random.default_rng(0).integers(0, 256, (b, k, s, s, 3), dtype=np.uint8)  # the API takes NumPy
    tags = [{key: values[i % len(values)] for key, values in cfg.tags.items()} for i in range(b)]
    return model, b, lambda: model.loss(clips, ["none"] * b, tags)


MODELS = {"policy": _policy, "world_model": _world_model, "reasoner": _reasoner}


def bench(name: str, *, preset: str, device: str, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, batch, loss_fn = MODELS[name](preset, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = perf_counter() - start
    return {"model": name, "batch": batch, "steps": steps, "seconds": seconds,
            "samples_per_s": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps,
            "parameters": sum(p.numel() for p in model.parameters()),
            "config": dataclasses.asdict(model.config)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=["tiny", "default", "gpu"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    out = {"preset": args.preset, "device": args.device, "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
           "threads": torch.get_num_threads(), "results": []}
    for name in args.models:
        r = bench(name, preset=args.preset, device=args.device, warmup=args.warmup, steps=args.steps)
        print(f"{name:12s} batch {r['batch']:4d}  {r['ms_per_step']:9.1f} ms/step  "
              f"{r['samples_per_s']:10.0f} samples/s  ({r['parameters'] / 1e6:.1f} M parameters)", flush=True)
        out["results"].append(r)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
