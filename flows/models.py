"""The model registry from Python and from `worldloop models list | show | promote VERSION | rollback`.

Every function takes a ``flows.runtime.Context`` (one world of one lake) and returns a summary dict,
the one the CLI prints (``render``). A manual ``promote`` or ``rollback`` moves the aliases the way
the promote flow does: when the world's endpoint is up (its Serve application runs on the Ray
cluster ``flows.runtime.ensure_ray`` connects to) the version is deployed and probed first and the
aliases move only once it answers (``flows.promote.roll_out``); when no endpoint is up they move at
once and the summary says so. Aliases: ``stages.registry`` (``champion``, ``previous``,
``challenger``; a rollback swaps champion and previous, so a second rollback undoes the first).
"""
from __future__ import annotations

import dataclasses
import os

from flows.promote import flow_run_label, roll_out
from flows.runtime import POLICY, Context, ensure_ray
from stages.registry import AliasEvent, ModelVersion


def _event(e: AliasEvent) -> dict:
    return dataclasses.asdict(e) | {"set_at": e.set_at.isoformat()}


def list_models(ctx: Context, *, name: str = POLICY) -> dict:
    """Every version of ``name`` with its aliases, evaluation mean and gate verdict."""
    aliases = ctx.registry.aliases(name)
    rows = [{"version": mv.version, "kind": mv.kind, "created_at": mv.created_at.isoformat(),
             "aliases": sorted(a for a, v in aliases.items() if v == mv.version),
             "eval_mean": mv.metrics.get("eval_mean"), "verified": mv.manifest is not None,
             "gate": (mv.metrics.get("gate") or {}).get("reason")} for mv in ctx.registry.versions(name)]
    return {"command": "models list", "world": ctx.world_name, "name": name, "aliases": aliases, "versions": rows}


def show(ctx: Context, *, version: int | None = None, alias: str | None = None, name: str = POLICY) -> dict:
    """One version (by number, by alias, or the latest): its row, artifact files and alias moves."""
    mv = ctx.registry.get(name, version=version, alias=alias)
    if mv is None:
        which = f"version {version}" if version is not None else f"alias {alias}" if alias else "version"
        raise ValueError(f"{name} has no {which} in {ctx.world_uri}")
    moves = [_event(e) for e in ctx.registry.history(name) if e.version == mv.version]
    files = mv.manifest or {}
    return {"command": "models show", "world": ctx.world_name, "name": name, "version": mv.version,
            "kind": mv.kind, "artifact_uri": mv.artifact_uri, "created_at": mv.created_at.isoformat(),
            "aliases": sorted(a for a, v in ctx.registry.aliases(name).items() if v == mv.version),
            "files": len(files), "bytes": sum(f["size"] for f in files.values()), "verified": mv.manifest is not None,
            "metrics": mv.metrics, "lineage": mv.lineage, "config": mv.config, "history": moves}


def endpoint_up(ctx: Context) -> bool:
    """Whether this world's act application runs on a cluster that outlives this command (an initialized
    Ray, RAY_ADDRESS or `worldloop up`'s); a cluster of this command's own serves nothing yet."""
    import ray
    from ray import serve

    from serving.cluster import running_address

    if not (ray.is_initialized() or os.environ.get("RAY_ADDRESS") or running_address()):
        return False
    ensure_ray()
    app = ctx.config.serve.app_name or f"act-{ctx.world_name}"
    return app in serve.status().applications


def _move(ctx: Context, *, version: int, move, serve: bool | None, name: str) -> dict:
    """Roll out through Serve when the endpoint is up (or ``serve`` is True), else move at once."""
    if name != POLICY and serve:
        raise ValueError(f"only the {POLICY} is served; move {name}'s aliases with serve=False")
    deploy = endpoint_up(ctx) if serve is None and name == POLICY else bool(serve)
    out = roll_out(ctx, version=version, move=move, serve=deploy)
    note = ("deployed and probed before the aliases moved" if deploy
            else "no endpoint is up: the aliases moved without a deployment")
    return {k: v for k, v in out.items() if k != "events"} | {
        "deployed": deploy and out["moved"], "note": note,
        "events": [_event(e) for e in out.get("events", [])],
        "aliases": ctx.registry.aliases(name)}


def promote(ctx: Context, *, version: int, reason: str = "", name: str = POLICY, serve: bool | None = None) -> dict:
    """Make ``version`` the champion (the old one becomes ``previous``) by hand, gate or no gate."""
    mv: ModelVersion | None = ctx.registry.get(name, version=version)
    if mv is None:
        raise ValueError(f"{name} has no version {version} in {ctx.world_uri}")
    if ctx.registry.aliases(name).get("champion") == mv.version:
        raise ValueError(f"{name} v{version} is already the champion")
    why = reason or "promoted by hand"
    out = _move(ctx, version=mv.version, serve=serve, name=name, move=lambda: ctx.registry.promote(
        name, mv.version, reason=why, flow_run=flow_run_label(), gate=mv.metrics.get("gate")))
    return {"command": "models promote", "world": ctx.world_name, "name": name, "version": mv.version} | out


def rollback(ctx: Context, *, reason: str = "", name: str = POLICY, serve: bool | None = None) -> dict:
    """Make ``previous`` the champion again (and the rolled-back champion ``previous``)."""
    current = ctx.registry.aliases(name)
    if "previous" not in current or "champion" not in current:
        raise ValueError(f"{name} has no previous champion to roll back to in {ctx.world_uri}")
    why = reason or f"rolled back from v{current['champion']} by hand"
    out = _move(ctx, version=current["previous"], serve=serve, name=name,
                move=lambda: ctx.registry.rollback(name, reason=why, flow_run=flow_run_label()))
    return {"command": "models rollback", "world": ctx.world_name, "name": name,
            "from_version": current["champion"], "version": current["previous"]} | out


def render(summary: dict) -> str:
    """A short human-readable account of a `worldloop models` command."""
    cmd = summary["command"]
    if cmd == "models list":
        lines = [f"{summary['name']} ({summary['world']}): {len(summary['versions'])} versions"]
        for r in summary["versions"]:
            score = f"{r['eval_mean']:.2f}" if isinstance(r["eval_mean"], (int, float)) else "-"
            lines.append(f"  v{r['version']:<4} {','.join(r['aliases']) or '-':<20} eval {score:>8}  "
                         f"{r['created_at'][:19]}{'' if r['verified'] else '  (no manifest)'}"
                         + (f"\n        gate: {r['gate']}" if r["gate"] else ""))
        return "\n".join(lines)
    if cmd == "models show":
        gate = (summary["metrics"].get("gate") or {}).get("reason")
        lines = [f"{summary['name']} v{summary['version']} ({summary['kind']}, {summary['world']})  "
                 f"aliases: {', '.join(summary['aliases']) or '-'}",
                 f"  artifact  {summary['artifact_uri']}  {summary['files']} files, {summary['bytes']} bytes"
                 f"{', sha256 recorded' if summary['verified'] else ', no manifest (registered before hashes)'}",
                 f"  created   {summary['created_at']}",
                 f"  eval      {summary['metrics'].get('eval_mean', '-')}",
                 *([f"  gate      {gate}"] if gate else [])]
        lines += [f"  {e['set_at'][:19]}  {e['alias']:<10} <- v{e['version']}  by {e['flow_run']}: {e['reason']}"
                  for e in summary["history"]]
        return "\n".join(lines)
    head = (f"{cmd}: {summary['name']} v{summary['version']} is the champion" if summary["moved"]
            else f"{cmd}: aliases NOT moved: {summary['error']}; champion "
                 f"{'still serving' if summary.get('restored') else 'NOT restored'}")
    url = summary.get("endpoint", {}).get("url")
    return "\n".join([head, f"  {summary['note']}" + (f"; endpoint {url}" if url else ""),
                      "  aliases " + ", ".join(f"{a} v{v}" for a, v in sorted(summary["aliases"].items()))])
