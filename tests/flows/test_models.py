"""`worldloop models list | show | promote | rollback` and the same from Python (flows.models)."""
from __future__ import annotations

import json

import pytest
import torch

from flows import models
from flows.cli import main
from flows.runtime import POLICY, Context
from models.policy import Policy, save


@pytest.fixture
def lake(tmp_path) -> tuple[Context, list[str]]:
    """A tiny car lake's registry holding three real tiny policies; the CLI's common arguments."""
    args = ["--config", "tiny", "--world", "carracing", "--lake", str(tmp_path / "lake"),
            "--landing", str(tmp_path / "landing")]
    ctx = Context.create(config="tiny", world="carracing", lake=str(tmp_path / "lake"), landing=str(tmp_path / "landing"))
    for seed in range(3):
        torch.manual_seed(seed)
        save(Policy(ctx.config.policy).eval(), tmp_path / f"p{seed}")
        ctx.registry.register(POLICY, tmp_path / f"p{seed}", kind="policy")
    return ctx, args


def test_promote_and_rollback_from_python(lake):
    ctx, _ = lake
    out = models.promote(ctx, version=1, reason="first", serve=False)
    assert out["moved"] and not out["deployed"] and "no endpoint" in out["note"]
    models.promote(ctx, version=3, serve=False)
    assert ctx.registry.aliases(POLICY) == {"champion": 3, "previous": 1}
    back = models.rollback(ctx, reason="v3 misbehaves", serve=False)
    assert (back["from_version"], back["version"]) == (3, 1) and back["aliases"] == {"champion": 1, "previous": 3}
    shown = models.show(ctx, version=1)
    assert shown["aliases"] == ["champion"] and shown["files"] >= 2 and shown["verified"]
    assert [(e["alias"], e["reason"]) for e in shown["history"]] == [
        ("champion", "first"), ("previous", "promoted by hand"), ("champion", "v3 misbehaves")]
    listed = models.list_models(ctx)
    assert [(r["version"], r["aliases"]) for r in listed["versions"]] == [(1, ["champion"]), (2, []), (3, ["previous"])]
    with pytest.raises(ValueError, match="already the champion"):
        models.promote(ctx, version=1, serve=False)
    with pytest.raises(ValueError, match="no version 9"):
        models.promote(ctx, version=9, serve=False)


def test_a_version_that_fails_to_deploy_moves_no_alias(ray_cluster, lake):
    ctx, _ = lake
    mv = ctx.registry.get(POLICY, version=2)
    with open(f"{mv.artifact_uri}/config.json", "a") as f:
        f.write(" ")  # tampered after registration
    out = models.promote(ctx, version=2, serve=True)
    assert not out["moved"] and not out["deployed"] and "does not match its registered manifest" in out["error"]
    assert ctx.registry.aliases(POLICY) == {} and "NOT moved" in models.render(out)


def test_cli_models_commands(lake, capsys):
    _, args = lake
    assert main(["models", "promote", "2", "--no-serve", "--reason", "by hand", *args]) == 0
    assert "policy v2 is the champion" in capsys.readouterr().out
    assert main(["models", "rollback", "--no-serve", *args]) == 2
    assert "no previous champion" in capsys.readouterr().err
    assert main(["models", "list", "--json", *args]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["aliases"] == {"champion": 2} and len(listed["versions"]) == 3
    assert main(["models", "show", *args]) == 0
    text = capsys.readouterr().out
    assert text.startswith("policy v2 (policy, carracing)") and "champion   <- v2" in text and "by hand" in text


def test_the_next_fit_continues_from_the_latest_version_unless_the_model_changed(lake):
    import dataclasses

    from flows.train import warm_start

    ctx, _ = lake
    cfg = ctx.config.policy
    same = dataclasses.asdict(cfg)
    assert warm_start(ctx, POLICY, same).version == 3
    recipe = dataclasses.asdict(dataclasses.replace(cfg, steps=cfg.steps * 2, lr=cfg.lr / 2, batch_size=7))
    assert warm_start(ctx, POLICY, recipe).version == 3  # a new recipe goes on from the same weights
    for change in ({"hidden": cfg.hidden * 2}, {"history": cfg.history + 1}, {"dropout": 0.5}):
        assert warm_start(ctx, POLICY, dataclasses.asdict(dataclasses.replace(cfg, **change))) is None, change
    off = dataclasses.replace(ctx, config=dataclasses.replace(
        ctx.config, train=dataclasses.replace(ctx.config.train, warm_start=False)))
    assert warm_start(off, POLICY, same) is None
