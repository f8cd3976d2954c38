"""Part 3 of `make bench-world-model`: the synthesis plausibility filter measured against the truth.

Synthesis drives the neural simulator (the dynamics model instructing the generator) with
counterfactual actions from real windows (the world's perturbation and recovery,
``stages.synthesize.counterfactual``, the flywheel's offsets and drift) and keeps the variants
its filters find plausible: the frame heuristics (``stages.synthesize.plausibility``) and the
inverse-dynamics critic (frames that do not show the actions that drove them), both measured
here, alone and together.
Both built-in worlds reproduce a logged state from the seed and the actions so far, so here the
same counterfactual actions are also replayed in the real simulator from the same state. A
variant is *contradicted* when its generated frames are further from the real counterfactual
frames than the parent's last frame is (mean PSNR over the variant below the copy-last-frame
PSNR: the generator did worse than predicting nothing changes). Reported: the filter's
rejection rate, the share of kept variants the real simulator contradicts (false keeps) and
the share of dropped variants that were faithful (false drops), for the heuristics alone and
with the critic.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models import world_model as wm
from stages import synthesize

OFFSETS, DRIFT_STEPS, HORIZON = (-0.5, 0.5), 6, 12  # flows.config.SynthConfig's defaults
MAX_FRAME_CHANGE, MAX_COLOR_SHIFT, MAX_IDM_RATIO = 40.0, 30.0, 1.5  # SynthConfig's defaults


def _replay(world, e: dict, start: int, actions: np.ndarray) -> np.ndarray:
    """Frames o[start+1 ..] of episode ``e`` replayed from its seed, the logged actions up to
    ``start`` and then ``actions``."""
    env = world.make_env(int(e["seed"]), e["task"])
    try:
        env.reset()
        for a in e["actions"][:start]:
            env.step(a)
        return np.stack([env.step(a)[0] for a in actions])
    finally:
        env.close()


def measure(world, generator, dynamics, held_out: list[dict], *, variants: int, seed: int) -> dict[str, Any]:
    """Figures of the filters on ``variants`` counterfactual rollouts from held-out windows."""
    K, rng = max(generator.config.history, dynamics.config.history), np.random.default_rng(seed)
    picks = [(e, int(rng.integers(max(K - 1, world.spec.warmup_steps), len(e["frames"]) - HORIZON - 1)))
             for e in (held_out[i % len(held_out)] for i in range(variants))
             if len(e["frames"]) - HORIZON - 1 > max(K - 1, world.spec.warmup_steps)]
    if not picks:
        return {}
    history = np.stack([e["frames"][s - K + 1:s + 1] for e, s in picks])
    actions = np.stack([e["actions"][s:s + HORIZON + 1] for e, s in picks])
    labels = np.stack([e["expert_actions"][s:s + HORIZON + 1] for e, s in picks])
    batch = {"history_BKHWC": history, "parent_actions_BTA": actions, "parent_labels_BTA": labels,
             "history_actions_BKA": np.stack([e["actions"][s - K + 1:s + 1] for e, s in picks]),
             "history_states_BKS": np.stack([e["states"][s - K + 1:s + 1] for e, s in picks]).astype(np.float32),
             "tasks": np.array([e["instruction"] for e, _ in picks], dtype=object)}
    torch.manual_seed(seed)
    out = synthesize.synthesize_batch(batch, model=generator, dynamics=dynamics, world=world, offsets=OFFSETS,
                                      drift_steps=DRIFT_STEPS, max_frame_change=MAX_FRAME_CHANGE,
                                      max_color_shift=MAX_COLOR_SHIFT, max_idm_ratio=MAX_IDM_RATIO, seed=seed)
    # the actions the generator was driven by: steps t..t+H-1 of the counterfactual
    driven, _, _ = synthesize.counterfactual(world, actions, labels, out["offsets_B"], drift_steps=DRIFT_STEPS, seed=seed)
    real = np.stack([_replay(world, e, s, driven[i, :-1]) for i, (e, s) in enumerate(picks)])
    generated = out["frames_BTHWC"]
    kept = np.array([r is None for r in out["reject_reasons"]])
    by_critic = np.array([r is not None and "inverse-dynamics" in r for r in out["reject_reasons"]])
    model_psnr = np.array([np.mean(wm.frame_metrics(generated[i:i + 1], real[i:i + 1])["psnr"]) for i in range(len(picks))])
    still = np.repeat(history[:, -1:], real.shape[1], axis=1)
    copy_psnr = np.array([np.mean(wm.frame_metrics(still[i:i + 1], real[i:i + 1])["psnr"]) for i in range(len(picks))])
    faithful = model_psnr >= copy_psnr
    heuristic = kept | by_critic  # what the frame heuristics alone keep

    def rates(keep: np.ndarray, suffix: str) -> dict[str, float]:
        return {f"filter_rejection_rate{suffix}": float(1 - keep.mean()),
                f"filter_false_keep_rate{suffix}": float((keep & ~faithful).sum() / max(keep.sum(), 1)),
                f"filter_false_drop_rate{suffix}": float((~keep & faithful).sum() / max((~keep).sum(), 1))}
    return {"filter_variants": len(picks), **rates(kept, ""), **rates(heuristic, "_heuristic"),
            "filter_faithful_rate": float(faithful.mean()), "filter_rejected_by_critic": int(by_critic.sum()),
            "filter_idm_error_real": float(out["idm_error_real"]), "filter_idm_error_logged": float(out["idm_error_logged"]),
            "filter_idm_error_faithful": float(out["idm_error_B"][faithful].mean()) if faithful.any() else None,
            "filter_idm_error_contradicted": float(out["idm_error_B"][~faithful].mean()) if (~faithful).any() else None,
            "counterfactual_psnr": float(model_psnr.mean()), "counterfactual_psnr_copy_last": float(copy_psnr.mean())}


def table(f: dict[str, Any], worlds: list[str]) -> list[str]:
    lines = ["", "Synthesis plausibility filters against counterfactuals replayed in the real simulator "
             "(frame heuristics alone / with the inverse-dynamics critic):", "",
             "| world | variants | faithful | rejected | kept but contradicted | dropped but faithful | "
             "critic's error: real frames / generated under logged actions / faithful / contradicted | PSNR vs real counterfactual (copy-last) |",
             "|---|---|---|---|---|---|---|---|"]
    def both(key: str, w: str) -> str:
        return f"{f[f'{key}_heuristic_{w}']:.2f} / {f[f'{key}_{w}']:.2f}"

    for w in worlds:
        if f.get(f"filter_variants_{w}") is None:
            continue
        errors = " / ".join("-" if f.get(f"filter_idm_error_{k}_{w}") is None else f"{f[f'filter_idm_error_{k}_{w}']:.3f}"
                            for k in ("real", "logged", "faithful", "contradicted"))
        lines.append(f"| {w} | {f[f'filter_variants_{w}']} | {f[f'filter_faithful_rate_{w}']:.2f} | "
                     f"{both('filter_rejection_rate', w)} | {both('filter_false_keep_rate', w)} | "
                     f"{both('filter_false_drop_rate', w)} | {errors} | {f[f'counterfactual_psnr_{w}']:.2f} "
                     f"({f[f'counterfactual_psnr_copy_last_{w}']:.2f}) |")
    return lines
