"""Training-step throughput and model FLOPs utilisation of each model at a preset on one device.

    .venv/bin/python -m benchmarks.bench_train_step --preset default --device cpu
    python -m benchmarks.bench_train_step --preset gpu --device cuda --dtype float32 bfloat16

For the policy, the world model's generator and reasoner (``dynamics``) and the scene reasoner:
the preset's model and batch size on random uint8 frames (the shapes training uses), ``--warmup``
AdamW steps, then ``--steps`` timed steps (forward, backward, optimizer), synchronised on CUDA,
once per ``--dtype``: float32 (on CUDA with TF32 tensor cores for matrix products and
convolutions, cuDNN's default for the latter), or bfloat16 autocast (mixed precision: fp32 weights
and optimizer, bf16 matrix products, as bf16 training runs). Each step clips the gradient norm to
1, as the training loop (``stages.train``) does. It measures the model's compute only: batches are
built once on the device, so the sampler and Ray Train are not in it.

Model FLOPs per step (forward and backward, optimizer excluded) are counted by
``torch.utils.flop_counter.FlopCounterMode`` over one step; MFU = FLOPs per step x steps per second
over the device's dense peak for the dtype (datasheet, ``PEAK_TFLOPS``: TF32's for float32; or
``--peak-tflops``), and beside it over a large matrix product timed in the same run (``--ceiling``:
the rate the chip reaches here). Stdout: one line per model and dtype, then as the last line one JSON object with
every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
from time import perf_counter

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import dynamics, policy, reasoner, world_model

# dense tensor-core peak TFLOP/s by device-name fragment and dtype (vendors' datasheets, SXM parts;
# float32 runs in TF32 on these)
PEAK_TFLOPS = {"H200": {"bfloat16": 989.4, "float32": 494.7}, "H100": {"bfloat16": 989.4, "float32": 494.7},
               "A100": {"bfloat16": 312.0, "float32": 156.0}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _frames(*shape: int, device: str) -> torch.Tensor:
    return torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, device=device)


def _batch(cfg, batch: int | None):
    return dataclasses.replace(cfg, batch_size=batch) if batch else cfg


def _policy(preset: str, device: str, batch: int | None):
    cfg = _batch(policy.preset(preset), batch)
    model = policy.Policy(cfg).to(device)
    frames = _frames(cfg.batch_size, cfg.history, cfg.image_size, cfg.image_size, device=device)
    target = torch.rand(cfg.batch_size, 3, device=device)
    return model, cfg.batch_size, lambda: model.loss(frames, target)


def _world_model(preset: str, device: str, batch: int | None):
    cfg = _batch(world_model.preset(preset), batch)
    model = world_model.WorldModel(cfg).to(device)
    b, s = cfg.batch_size, cfg.image_size
    history, nxt = _frames(b, cfg.history, s, s, device=device), _frames(b, s, s, device=device)
    action = torch.rand(b, cfg.action_dim, device=device)
    return model, b, lambda: model.loss(history, action, nxt)


def _dynamics(preset: str, device: str, batch: int | None):
    cfg = _batch(dataclasses.replace(dynamics.preset(preset), state_dim=8, signals=("success",)), batch)
    model = dynamics.Dynamics(cfg).to(device)
    b, k, s = cfg.batch_size, cfg.history, cfg.image_size
    frames, actions = _frames(b, k, s, s, device=device), torch.rand(b, k, cfg.action_dim, device=device)
    states = torch.randn(b, k, cfg.state_dim, device=device)
    targets = dynamics.Targets(next_state_BKS=torch.randn(b, k, cfg.state_dim, device=device),
                               reward_BK=torch.randn(b, k, device=device),
                               next_signals_BKG=torch.randint(0, 2, (b, k, 1), device=device).float(),
                               done_BK=torch.zeros(b, k, device=device),
                               has_next_BK=torch.ones(b, k, dtype=torch.bool, device=device))
    return model, b, lambda: model.loss(frames, actions, states, targets)["loss"]


def _reasoner(preset: str, device: str, batch: int | None):
    cfg = _batch(reasoner.preset(preset), batch)
    model = reasoner.Reasoner(cfg).to(device)
    b, k, s = cfg.batch_size, cfg.frames_per_clip, cfg.image_size
    clips = np.random.default_rng(0).integers(0, 256, (b, k, s, s, 3), dtype=np.uint8)  # the API takes NumPy
    tags = [{key: values[i % len(values)] for key, values in cfg.tags.items()} for i in range(b)]
    return model, b, lambda: model.loss(clips, ["none"] * b, tags)


MODELS = {"policy": _policy, "world_model": _world_model, "dynamics": _dynamics, "reasoner": _reasoner}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The datasheet's dense peak for a device name and dtype, or None when the device is not listed."""
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in device_name:
            return peaks[dtype]
    return None


def matmul_tflops(*, device: str, dtype: str, n: int, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n matrix product in ``dtype`` on ``device`` (mean of ``repeats`` after 3 warm-ups)."""
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeats / (perf_counter() - start) / 1e12


def bench(name: str, *, preset: str, device: str, dtype: str, warmup: int, steps: int, batch: int | None = None,
          compile: bool = False) -> dict:
    torch.manual_seed(0)
    model, batch, loss_fn = MODELS[name](preset, device, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(fn) -> None:
        with _autocast(device, dtype):
            loss = fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    with FlopCounterMode(display=False) as counter:  # eager: a compiled graph would hide the ops
        step(loss_fn)
    flops = counter.get_total_flops()
    run = torch.compile(loss_fn) if compile else loss_fn
    for _ in range(warmup):
        step(run)
    _sync(device)
    start = perf_counter()
    for _ in range(steps):
        step(run)
    _sync(device)
    seconds = perf_counter() - start
    return {"model": name, "dtype": dtype, "batch": batch, "steps": steps, "seconds": seconds,
            "samples_per_s": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps,
            "compiled": compile, "gflop_per_step": flops / 1e9, "tflops": flops * steps / seconds / 1e12,
            "parameters": sum(p.numel() for p in model.parameters()),
            "config": dataclasses.asdict(model.config)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=["tiny", "default", "gpu"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, help="every model's batch size (default: the preset's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's loss")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for every dtype "
                        "(default: PEAK_TFLOPS by device name; none for a CPU)")
    parser.add_argument("--ceiling", type=int, default=0, metavar="N",
                        help="also time an N x N x N matrix product per dtype as the reachable ceiling (0: no)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # float32 = TF32 on CUDA
    name = torch.cuda.get_device_name() if cuda else platform.processor()
    out = {"preset": args.preset, "device": args.device, "torch": torch.__version__, "device_name": name,
           "threads": torch.get_num_threads(), "peak_tflops": {}, "matmul_tflops": {}, "results": []}
    for dtype in args.dtype:
        out["peak_tflops"][dtype] = args.peak_tflops or (peak_tflops(name, dtype) if cuda else None)
        if args.ceiling:
            out["matmul_tflops"][dtype] = matmul_tflops(device=args.device, dtype=dtype, n=args.ceiling)
            print(f"{args.ceiling}^3 matmul {dtype:8s} {out['matmul_tflops'][dtype]:8.1f} TFLOP/s", flush=True)
    for model in args.models:
        for dtype in args.dtype:
            r = bench(model, preset=args.preset, device=args.device, dtype=dtype, warmup=args.warmup,
                      steps=args.steps, batch=args.batch, compile=args.compile)
            peak, ceiling = out["peak_tflops"][dtype], out["matmul_tflops"].get(dtype)
            r["mfu"] = r["tflops"] / peak if peak else None
            r["of_matmul"] = r["tflops"] / ceiling if ceiling else None
            mfu = f"  MFU {r['mfu']:6.2%}" if peak else ""
            print(f"{model:12s} {dtype:8s} batch {r['batch']:4d}  {r['ms_per_step']:9.1f} ms/step  "
                  f"{r['samples_per_s']:10.0f} samples/s  {r['gflop_per_step']:8.3g} GFLOP/step  "
                  f"{r['tflops']:7.3g} TFLOP/s{mfu}  ({r['parameters'] / 1e6:.1f} M parameters)", flush=True)
            out["results"].append(r)
    for model in args.models:  # bf16 against fp32, both measured in this run
        rates = {r["dtype"]: r["samples_per_s"] for r in out["results"] if r["model"] == model}
        if len(rates) == 2:
            out.setdefault("bf16_speedup", {})[model] = rates["bfloat16"] / rates["float32"]
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
