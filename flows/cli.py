"""`worldloop`: run the flywheel, or any one stage, from the command line.

    worldloop run --turns 1 --config default      # whole turns
    worldloop fleet | curate | synthesize | train | evaluate | ablate | promote   # one stage each
    worldloop serve                               # keep the champion's endpoint up
    worldloop up | down                           # a Ray cluster with Serve that outlives the commands

Every command takes --lake and --landing (local paths or s3:// URIs; credentials come from the
AWS_* environment), --config {tiny,default,gpu}, and --json (one JSON object on stdout).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from sim import worlds


def _environment() -> None:
    """Quiet, offline defaults; set before Prefect, Ray or the Hugging Face libraries import."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")  # a loaded 2-core machine
    os.environ.setdefault("PREFECT_HOME", os.path.abspath(os.path.join(".worldloop", "prefect")))
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)  # Prefect creates only the last level
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray forks its workers after lance is imported; worldloop opens no lance handle across a fork.
    warnings.filterwarnings("ignore", message="lance is not fork-safe")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="default", choices=["tiny", "default", "gpu"],
                        help="named config preset (default: %(default)s)")
    common.add_argument("--lake", default="./lake", help="Lance lake: a path or s3:// URI")
    common.add_argument("--landing", default="./landing", help="landing zone of raw logs: a path or s3:// URI")
    common.add_argument("--world", default=worlds.DEFAULT, help="registered world (`worldloop worlds` lists them)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (JSON or text), e.g. --set train.num_workers=1; repeatable")
    common.add_argument("--config-file", default=None, help="JSON or YAML file of config sections or dotted keys")
    common.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    turn = argparse.ArgumentParser(add_help=False)
    turn.add_argument("--turn", type=int, default=None, help="flywheel turn (default: the open one)")
    version = argparse.ArgumentParser(add_help=False)
    version.add_argument("--version", type=int, default=None, help="policy version (default: the latest)")

    parser = argparse.ArgumentParser(prog="worldloop", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run whole turns of the flywheel")
    run.add_argument("--turns", type=int, default=1)
    run.add_argument("--no-serve", action="store_true", help="do not deploy the champion to Ray Serve")
    fleet = sub.add_parser("fleet", parents=[common, turn], help="drive episodes and log them as MCAP")
    fleet.add_argument("--endpoint", default=None, help="drive with the policy served at this URL")
    curate = sub.add_parser("curate", parents=[common, turn], help="ingest new logs into Lance tables")
    curate.add_argument("--mapping", default=None,
                        help='JSON file: role -> topic/feature names, e.g. {"camera": "/front/image"}')
    curate.add_argument("--reasoner", default=None,
                        help="directory or s3:// URI of a saved reasoner or a local vision-language model "
                             "(default: the lake's champion reasoner, trained on first use)")
    sub.add_parser("synthesize", parents=[common, turn], help="generate synthetic variants with the world model")
    train = sub.add_parser("train", parents=[common, turn], help="post-train on Ray Train")
    train.add_argument("--model", default="policy", help="policy (default), world_model or dynamics")
    evaluate = sub.add_parser("evaluate", parents=[common, turn, version], help="closed-loop evaluation")
    evaluate.add_argument("--in", dest="simulator", default="real", choices=["real", "neural"],
                          help="the real simulator (default) or the world model's neural simulator")
    ablate = sub.add_parser("ablate", parents=[common, turn],
                            help="does the lake's synthetic data help? real-only vs real + synthetic policies")
    ablate.add_argument("--seeds", type=int, default=3, help="training seeds per arm")
    promote = sub.add_parser("promote", parents=[common, version], help="gate and roll out to Ray Serve")
    promote.add_argument("--no-serve", action="store_true")
    sub.add_parser("status", parents=[common], help="tables, registry and turns of a lake")
    models = sub.add_parser("models", help="the policy registry: list | show | promote VERSION | rollback")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", parents=[common], help="versions with their aliases and gate verdicts")
    models_show = models_sub.add_parser("show", parents=[common], help="one version: metrics, files, alias moves")
    models_show.add_argument("version", nargs="?", type=int, default=None, help="default: the champion, else the latest")
    models_promote = models_sub.add_parser("promote", parents=[common],
                                           help="make VERSION the champion (deployed and probed first when serving)")
    models_promote.add_argument("version", type=int)
    models_rollback = models_sub.add_parser("rollback", parents=[common], help="make the previous champion the champion again")
    for p in (models_promote, models_rollback):
        p.add_argument("--reason", default="", help="why (kept in the alias history)")
        p.add_argument("--no-serve", action="store_true", help="move the aliases without deploying")
    worlds_cmd = sub.add_parser("worlds", help="the registered worlds with their features")
    worlds_cmd.add_argument("--json", action="store_true", help="print them as one JSON object on stdout")
    serve = sub.add_parser("serve", parents=[common], help="serve the champion until interrupted")
    serve.add_argument("--port", type=int, default=None)
    up = sub.add_parser("up", help="start (or join) a Ray cluster with Serve that outlives the command")
    up.add_argument("--host", default="127.0.0.1", help="Serve's HTTP host; beyond loopback needs WORLDLOOP_API_TOKEN")
    up.add_argument("--port", type=int, default=None, help="Serve's HTTP port (default: $WORLDLOOP_SERVE_PORT or 8000)")
    up.add_argument("--ray-port", type=int, default=None, help="the Ray head's GCS port (default: a free one)")
    up.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the head (default: max(4, cores))")
    down = sub.add_parser("down", help="stop exactly what `worldloop up` started")
    down.add_argument("--grace-period", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    for cmd in (up, down):
        cmd.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return parser


def _dispatch(args: argparse.Namespace) -> dict:
    if args.command == "worlds":
        return _worlds()
    if args.command in ("up", "down"):
        from serving import cluster

        if args.command == "down":
            return {"stage": "down", **cluster.down(grace_s=args.grace_period)}
        return {"stage": "up", **cluster.up(host=args.host, port=args.port, ray_port=args.ray_port,
                                            num_cpus=args.num_cpus)}
    from flows import ablate, curate, evaluate, fleet, flywheel, promote, synthesize, train

    common = {"config": args.config, "lake": args.lake, "landing": args.landing, "world": args.world,
              "overrides": args.overrides or None, "config_file": args.config_file}
    if args.command == "run":
        return flywheel.flywheel_flow(**common, turns=args.turns, serve=not args.no_serve)
    if args.command == "fleet":
        return fleet.fleet_flow(**common, turn=args.turn, endpoint=args.endpoint)
    if args.command == "curate":
        mapping = json.loads(Path(args.mapping).read_text()) if args.mapping else None
        return curate.curate_flow(**common, turn=args.turn, mapping=mapping, reasoner=args.reasoner)
    if args.command == "synthesize":
        return synthesize.synthesize_flow(**common, turn=args.turn)
    if args.command == "train":
        return train.train_flow(**common, model=args.model, turn=args.turn)
    if args.command == "evaluate":
        return evaluate.evaluate_flow(**common, version=args.version, turn=args.turn, simulator=args.simulator)
    if args.command == "ablate":
        return ablate.ablate_flow(**common, seeds=args.seeds, turn=args.turn)
    if args.command == "promote":
        return promote.promote_flow(**common, version=args.version, serve=not args.no_serve)
    if args.command == "status":
        return _status(args)
    if args.command == "models":
        return _models(args)
    return _serve(args)


def _worlds() -> dict:
    """Every registered world's spec: features, actions, tasks, rate, score, events, tags, seeds."""
    return {"worlds": {name: worlds.spec(name).describe() for name in worlds.names()}}


def _status(args: argparse.Namespace) -> dict:
    """What the lake holds: table rows, versions and turn tags; registry versions and aliases."""
    from flows.runtime import MODELS, Context

    ctx = Context.create(config=args.config, lake=args.lake, landing=args.landing, world=args.world,
                         overrides=args.overrides or None, config_file=args.config_file)
    tables = {name: {"rows": ctx.lake.count(name), "version": ctx.lake.version(name),
                     "tags": sorted(ctx.lake.tags(name))}
              for name in ("episodes", "frames", "clips", "rejects", "sources", "evaluations", "ablations", "turns")
              if ctx.lake.exists(name)}
    models = {}
    for name in (*MODELS, "reasoner"):
        champion = ctx.registry.get(name, alias="champion")
        models[name] = {"versions": [mv.version for mv in ctx.registry.versions(name)],
                        "champion": champion.version if champion else None}
    return {"lake": ctx.lake_uri, "world": ctx.world_name, "next_turn": ctx.current_turn(), "tables": tables, "models": models}


def _models(args: argparse.Namespace) -> dict:
    """`worldloop models ...`: the body is flows.models."""
    from flows import models
    from flows.runtime import Context

    ctx = Context.create(config=args.config, lake=args.lake, landing=args.landing, world=args.world,
                         overrides=args.overrides or None, config_file=args.config_file)
    if args.models_command == "list":
        return models.list_models(ctx)
    if args.models_command == "show":
        champion = ctx.registry.aliases("policy").get("champion")
        return models.show(ctx, version=args.version if args.version is not None else champion)
    serve = False if args.no_serve else None
    with ctx.writer_lock():  # the aliases are the lake's: one writer at a time
        if args.models_command == "promote":
            return models.promote(ctx, version=args.version, reason=args.reason, serve=serve)
        return models.rollback(ctx, reason=args.reason, serve=serve)


def _serve(args: argparse.Namespace) -> dict:
    import dataclasses

    from flows.promote import serve_champion
    from flows.runtime import Context, ensure_ray

    ctx = Context.create(config=args.config, lake=args.lake, landing=args.landing, world=args.world,
                         overrides=args.overrides or None, config_file=args.config_file)
    if args.port:
        ctx.config = dataclasses.replace(ctx.config, serve=dataclasses.replace(ctx.config.serve, port=args.port))
    if ctx.registry.get("policy", alias="champion") is None:
        raise ValueError(f"no {ctx.world_name} champion in {ctx.lake_uri}: run `worldloop run` first")
    ensure_ray()
    info = serve_champion.fn(ctx)
    print(f"serving {info['health']['model_name']}:v{info['health']['model_version']} at {info['url']} "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    if not args.json:
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return info


def render(summary: dict) -> str:
    """A short human-readable account of a stage or of whole turns."""
    if "turns" in summary:
        return "\n\n".join(_render_turn(t) for t in summary["turns"])
    if str(summary.get("command", "")).startswith("models "):
        from flows.models import render as render_models

        return render_models(summary)
    if "worlds" in summary:
        return "\n\n".join(_render_world(spec) for spec in summary["worlds"].values())
    if summary.get("stage") == "curate":
        return _render_curate(summary)
    if summary.get("stage") in ("up", "down"):
        return summary["message"]
    return json.dumps(summary, indent=2, default=str)


def _render_curate(c: dict) -> str:
    """The curate line of a turn, and where each reject came from."""
    lines = [f"curate  seen {c['seen']} = kept {c['kept']} + rejected {c['rejected']}, "
             f"+{c['rows_added'].get('frames', 0)} frames (listed {c['listed']})"]
    lines += [f"  rejected  {r['source']}: {r['stage']} {r['reason']}" for r in c["rejects"]]
    return "\n".join(lines)


def _render_tasks(tasks: dict[str, int]) -> list[str]:
    """The fleet's episodes per task, when they were not spread evenly (`fleet.focus`)."""
    if len(tasks) < 2 or max(tasks.values()) - min(tasks.values()) <= 1:
        return []
    return [" " * 14 + "episodes per task  " + "  ".join(f"{t} {n}" for t, n in tasks.items())]


def _render_turn(turn: dict) -> str:
    s = turn["stages"]
    ev, pr = s["evaluate"].get("results", {}), s["promote"]  # a screened-out candidate has no real results
    lines = [f"turn {turn['turn']}",
             f"  fleet       {s['fleet']['episodes']} episodes by {s['fleet']['driver']}, mean score "
             f"{s['fleet']['mean_score']:.3g}, {s['fleet']['interventions']} interventions  ({s['fleet']['wall_s']} s)",
             *_render_tasks(s["fleet"].get("tasks", {})),
             f"  curate      seen {s['curate']['seen']} = kept {s['curate']['kept']} + rejected "
             f"{s['curate']['rejected']}, +{s['curate']['rows_added']['frames']} frames  ({s['curate']['wall_s']} s)",
             *_render_clips(s["curate"]),
             f"  dynamics    v{s['train_dynamics']['version']}, loss "
             f"{s['train_dynamics']['metrics'].get('train_loss', float('nan')):.4f}  ({s['train_dynamics']['wall_s']} s)",
             f"  world model v{s['train_world_model']['version']}, loss "
             f"{s['train_world_model']['metrics'].get('train_loss', float('nan')):.4f}"
             f"{_conditioned(s['train_world_model'])}  ({s['train_world_model']['wall_s']} s)",
             f"  synthesize  {s['synthesize']['generated']} variants: kept {s['synthesize']['kept']}, rejected "
             f"{s['synthesize']['rejected']} ({s['synthesize']['rejected_by_critic']} by the inverse-dynamics critic), "
             f"expert labels on {s['synthesize']['expert_relabelled']}, +{s['synthesize']['synthetic_frames']} frames  "
             f"({s['synthesize']['wall_s']} s)",
             f"  policy      v{s['train_policy']['version']}, loss "
             f"{s['train_policy']['metrics'].get('train_loss', float('nan')):.4f}{_event_share(s['train_policy'])}"
             f"  ({s['train_policy']['wall_s']} s)",
             *([f"    synthetic frames {s['train_policy']['synthetic']['reason']}"] if "synthetic" in s["train_policy"] else []),
             f"  evaluate    ({s['evaluate']['wall_s']} s)"]
    if s["evaluate"].get("screen"):
        sc = s["evaluate"]["screen"]
        lines.append(f"    neural screen {'passed' if sc['passed'] else 'FAILED'}: candidate {sc['candidate']:.2f} vs "
                     f"champion {sc['champion']:.2f} over {sc['n']} starts (margin {sc['margin']:g})")
    for role, r in ev.items():
        rates = ", ".join(f"{k.replace('_', '-')} {v:.2f}" for k, v in r["signal_rates"].items())
        rates = f"  share of steps: {rates}" if rates else ""
        lines.append(f"    {role:<10} {r['model']:<18} {r['mean']:7.2f}  95% CI [{r['ci95'][0]:.2f}, "
                     f"{r['ci95'][1]:.2f}]  success {r['success_rate']:.2f}{rates}  "
                     f"interventions needed {r['interventions_per_episode']:.1f}")
        if len(r.get("per_task", {})) > 1:
            lines.append(" " * 15 + "per task  " + "  ".join(f"{t} {v:.2f}" for t, v in r["per_task"].items()))
    lines.append(f"  promote     {'PROMOTED' if pr['promote'] else 'kept champion'}: {pr['reason']}")
    if "endpoint" in pr:
        lines.append(f"  endpoint    {pr['endpoint']['url']}  champion policy:v{pr['champion_version']} "
                     f"score {pr['champion_score']:.4g}")
    companions = pr.get("companions", {})
    for app, url in companions.get("urls", {}).items():
        lines.append(f"  {app.split('-', 1)[0]:<11} {url}")
    for app, why in {**companions.get("skipped", {}), **({"companions": companions["error"]}
                                                          if "error" in companions else {})}.items():
        lines.append(f"  {app.split('-', 1)[0]:<11} not served: {why}")
    return "\n".join(lines)


def _render_world(spec: dict) -> str:
    actions = ", ".join(f"{a['name']} [{a['low']:g}, {a['high']:g}]" for a in spec["actions"])
    tasks = "; ".join(f"{t['name']}: {t['instruction']}" for t in spec["tasks"][:3])
    more = f" (+{len(spec['tasks']) - 3} more)" if len(spec["tasks"]) > 3 else ""
    return "\n".join([
        f"{spec['name']}  {spec['description']}",
        f"  camera      {spec['camera']} {spec['image_size']}x{spec['image_size']} RGB, {spec['rate_hz']:g} Hz, "
        f"up to {spec['max_steps']} steps, score: {spec['score']}",
        f"  actions     {actions}",
        f"  state       {', '.join(spec['state_names'])}",
        f"  policy sees pixels{' + ' + ', '.join(spec['policy_state']) if spec['policy_state'] else ''}"
        f"{' + the task sentence' if len(spec['tasks']) > 1 else ''}",
        f"  tasks       {tasks}{more}",
        f"  signals     {', '.join(spec['signals']) or '-'}; events {', '.join(e['name'] for e in spec['events'])}",
        "  tags        " + "; ".join(f"{k}: {'/'.join(v)}" for k, v in spec["tags"].items()),
        f"  held out    seeds {spec['eval_seeds'][0]}..{spec['eval_seeds'][-1]} ({len(spec['eval_seeds'])})"])


def _conditioned(train: dict) -> str:
    """Which dynamics model's vector the generator read, when it reads one."""
    return f", conditioned on {train['conditioned_on']}" if train.get("conditioned_on") else ""


def _event_share(train: dict) -> str:
    """How often training drew windows in oversampled event clips, against their share of windows,
    and (with ``train.focus``) from the tasks where the champion fell short."""
    m, out = train["metrics"], ""
    if "train_event_share" in m:
        out += f", event clips {m['train_event_share']:.0%} of draws ({m['train_event_share_natural']:.0%} of windows)"
    if "train_focus_share" in m:
        out += f", tasks short of the expert {m['train_focus_share']:.0%} of draws"
    return out


def _render_clips(curate: dict) -> list[str]:
    """The clips line of a curate summary, and the reasoner's held-out tag accuracy if measured."""
    clips = curate.get("clips") or {}
    if not clips.get("events"):
        return []
    events = ", ".join(f"{e} {n}" for e, n in sorted(clips["events"].items(), key=lambda kv: -kv[1]))
    lines = [f"  clips       +{curate['rows_added'].get('clips', 0)} ({events}), "
             f"{clips['duplicates']} near-duplicates"]
    describer, val = clips.get("describer") or {}, (clips.get("describer") or {}).get("val")
    if val:
        acc = " ".join(f"{k} {val['accuracy'][k]:.2f} (majority {val['majority_accuracy'][k]:.2f})"
                       for k in val["accuracy"])
        plan = val.get("plan") or {}
        if plan.get("accuracy") is not None:
            acc += f"; plan {plan['accuracy']:.2f} ({plan['n']} clips)"
        lines.append(f"  reasoner    {describer['source']}, tag accuracy on {val['n']} held-out clips: {acc}")
    elif describer:
        lines.append(f"  reasoner    {describer['source']}")
    return lines


def _exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM unwinds the command as an exit does, so the atexit hooks stop what it started:
    Prefect's temporary API server, the local Ray cluster and its Serve endpoints."""
    raise SystemExit(128 + signum)


def _ephemeral_endpoint(args: argparse.Namespace) -> bool:
    """Whether the command deploys an endpoint into a Ray cluster of its own (no RAY_ADDRESS, no
    `worldloop up`), which stops when the command exits."""
    if args.command not in ("run", "promote") or args.no_serve or os.environ.get("RAY_ADDRESS"):
        return False
    from serving.cluster import running_address

    return running_address() is None


def main(argv: list[str] | None = None) -> int:
    _environment()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # Ray's init installs the same kind of handler
    from flows.runtime import prefect_settings

    args = _parser().parse_args(argv)
    real_stdout = sys.stdout
    ephemeral = _ephemeral_endpoint(args)
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else real_stdout), prefect_settings():
            summary = _dispatch(args)
    except ValueError as err:
        print(f"worldloop {args.command}: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # `ray start` or Serve would not come up: say why, without a traceback
        if args.command not in ("up", "down"):
            raise
        print(f"worldloop {args.command}: {err}", file=sys.stderr)
        return 1
    if args.json and summary.get("stage") == "curate":  # the person watching reads what happened too
        print(render(summary), file=sys.stderr, flush=True)
    print(json.dumps(summary, default=str) if args.json else render(summary), file=real_stdout, flush=True)
    if ephemeral:
        print("note: the endpoint stops when this command exits (its Ray cluster is this process's own); "
              "run `worldloop up` first to keep it answering", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
