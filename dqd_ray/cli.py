"""The ``dqd-ray`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


class UsageError(ValueError):
    """A bad command-line argument. The message names the argument, the problem
    and what to pass instead; raised before any work starts (no Ray, no files)."""


def _at_least(flag: str, value: int | None, low: int, fix: str) -> None:
    """Refuses ``value < low``; None (the argument left at its default) passes."""
    if value is not None and value < low:
        raise UsageError(f"{flag} must be at least {low}, got {value}: {fix}")


def _check_out(flag: str, path: str | None, *, directory: bool, fix: str) -> None:
    """Refuses an output path that cannot be written as asked: a directory
    argument naming an existing file, a file argument naming an existing
    directory, or any path under an existing file."""
    if path is None:
        return
    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is an existing file, not a directory: {fix}")
    if not directory and p.is_dir():
        raise UsageError(f"{flag} {path} is a directory, not a file: {fix}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path} lies under {parent}, which is a file, "
                                 f"not a directory: {fix}")
            break


_NUM_CPUS_FIX = "pass the CPUs a local Ray may use, or leave it out for all of this machine's"


def _cmd_demo(args: argparse.Namespace) -> int:
    from dqd_ray.envs import ENV_IDS, make_env

    if args.env not in ENV_IDS:
        raise UsageError(f"--env {args.env!r} is not a QD environment: choose one of "
                         f"{', '.join(ENV_IDS)}")
    _at_least("--episodes", args.episodes, 1, "pass how many random-policy episodes to run")
    _at_least("--seed", args.seed, 0, "pass a non-negative integer seed")
    env = make_env(args.env)
    rng = np.random.default_rng(args.seed)
    print(f"{args.env}: obs {env.observation_space.shape}, act {env.action_space.shape}, "
          f"measures {list(env.measure_names)}")
    for ep in range(args.episodes):
        env.reset(seed=args.seed + ep)
        done, info = False, {}
        while not done:
            _, _, term, trunc, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
            done = term or trunc
        print(f"episode {ep}: fitness {env.episode_return:9.2f}  length {env._t:5d}  "
              f"measures {np.round(info['measures'], 3).tolist()}")
    env.close()
    return 0


def _print_result(summary: dict) -> None:
    final = summary.get("final") or {}
    print(f"run directory: {summary['run_dir']}")
    if "qd_score" in final:
        print(f"iterations {final['iteration']}  evaluations {final['evaluations']}  "
              f"QD score {final['qd_score']:.2f}  coverage {100 * final['coverage']:.2f}%  "
              f"best fitness {final['best_fitness']:.2f}")


def _cmd_run(args: argparse.Namespace) -> int:
    from dqd_ray.config import build_config
    from dqd_ray.loop import Experiment

    _check_out("--out", args.out, directory=True,
               fix="pass the path of a new run directory (dqd-ray creates it)")
    _at_least("--num-cpus", args.num_cpus, 1, _NUM_CPUS_FIX)
    cfg = build_config(args.preset, args.config, args.set)  # fails before Ray starts
    backend = "inprocess" if args.local_inprocess else "ray"
    exp = Experiment.create(cfg, args.out, backend=backend, address=args.address,
                            num_cpus=args.num_cpus)
    print(f"run directory: {exp.run_dir}")
    _print_result(exp.run())
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from dqd_ray.loop import Experiment

    _at_least("--num-cpus", args.num_cpus, 1, _NUM_CPUS_FIX)
    backend = "inprocess" if args.local_inprocess else "ray"
    exp = Experiment.resume(args.run_dir, args.set, backend=backend, address=args.address,
                            num_cpus=args.num_cpus)
    _print_result(exp.run())
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from dqd_ray.config import build_config, to_yaml

    print(to_yaml(build_config(args.preset, args.config, args.set)), end="")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from dqd_ray.sweeps import run_sweep

    summary = run_sweep(args.file, args.set, address=args.address, num_cpus=args.num_cpus,
                        resume=args.resume, dry_run=args.dry_run)
    return 1 if summary.get("errors") else 0


def _cmd_show(args: argparse.Namespace) -> int:
    from dqd_ray.analysis import show

    show.run(args.run_dirs, out=args.out)
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from dqd_ray.analysis.results import render_elite

    _at_least("--frame-every", args.frame_every, 1,
              "pass the env steps per GIF frame (1: every step)")
    _at_least("--steps", args.steps, 1, "pass the episode steps to render, or leave it out "
              "for the run's episode length")
    _at_least("--seed", args.seed, 0, "pass a non-negative integer seed, or leave it out for "
              "the seed the elite was archived with")
    _check_out("--out", args.out, directory=False,
               fix="pass the path of the GIF file to write, e.g. elite.gif")
    measures = None
    if args.measures:
        try:
            measures = [float(v) for v in args.measures.split(",")]
        except ValueError:
            measures = None
        if measures is None or not np.isfinite(measures).all():
            print(f"error: --measures takes comma-separated finite numbers, got "
                  f"{args.measures!r}", file=sys.stderr)
            return 2
    try:
        r = render_elite(args.run_dir, elite=args.elite, measures=measures, out=args.out,
                         steps=args.steps, seed=args.seed, frame_every=args.frame_every)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"elite row {r['row']} (cell {r['index']}), env seed {r['seed']}")
    print(f"  archived:     fitness {r['archived_fitness']:10.3f}  measures "
          f"{np.round(r['archived_measures'], 4).tolist()}")
    print(f"  re-evaluated: fitness {r['fitness']:10.3f}  measures "
          f"{np.round(r['measures'], 4).tolist()}")
    print(f"wrote {r['gif']} ({r['frames']} frames)")
    return 0


def _cmd_robustness(args: argparse.Namespace) -> int:
    from dqd_ray.analysis import show

    _at_least("--episodes", args.episodes, 1,
              "pass the new-seed episodes per elite (the paper uses 10)")
    _at_least("--seed", args.seed, 0, "pass a non-negative integer seed")
    _at_least("--num-cpus", args.num_cpus, 1, _NUM_CPUS_FIX)
    _check_out("--out", args.out, directory=True,
               fix="pass a directory for robustness.json and .png (created if missing)")
    show.robustness_command(args.run_dir, episodes=args.episodes, out=args.out,
                            own_seeds=args.own_seeds, seed=args.seed,
                            local_inprocess=args.local_inprocess, address=args.address,
                            num_cpus=args.num_cpus)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "envs":
        from dqd_ray.bench import envs

        envs.run(steps=args.steps, repeats=args.repeats, json_path=args.json)
        return 0
    if args.bench == "sphere":
        from dqd_ray.bench import sphere

        sphere.run(dim=args.dim, iterations=args.iterations, function=args.function,
                   seed=args.seed, json_path=args.json, compare_map_elites=args.map_elites,
                   selection_rule=args.selection_rule, report_every=args.report_every,
                   compare_cma_mae=args.cma_mae)
        return 0
    if args.bench == "system":
        from dqd_ray.bench import system

        system.run(workers=args.workers, env_id=args.env, genomes=args.genomes,
                   envs_per_worker=args.envs_per_worker, iterations=args.iterations,
                   json_path=args.json)
        return 0
    if args.bench == "learner":
        from dqd_ray.bench import learner

        learner.run(device=args.device, env_id=args.env, batch_size=args.batch_size,
                    updates=args.updates, repeats=args.repeats,
                    genomes=tuple(args.genomes), states=tuple(args.states),
                    threads=args.threads, modes=tuple(args.mode),
                    compare_previous=not args.no_previous, compile_step=args.compile,
                    json_path=args.json)
        return 0
    if args.bench == "rollout":
        from dqd_ray.bench import rollout

        rollout.run(env_ids=tuple(args.env) if args.env else rollout.ENV_IDS,
                    genomes=args.genomes, repeats=args.repeats, min_steps=args.min_steps,
                    stream=not args.no_stream, policies=tuple(args.policies),
                    json_path=args.json)
        return 0
    if args.bench == "coordinator":
        from dqd_ray.bench import coordinator

        coordinator.run(preset=args.preset, env_id=args.env, iterations=args.iterations,
                        rollout_s=args.rollout_s, profile=args.profile, sets=args.set,
                        json_path=args.json)
        return 0
    if args.bench == "iteration":
        from dqd_ray.bench import iteration

        iteration.run(preset=args.preset, env_id=args.env, iterations=args.iterations,
                      sets=args.set, workers=tuple(args.workers),
                      episode_steps=args.episode_steps, learner_json=args.learner_json,
                      assume_updates_per_s=args.assume_updates_per_s,
                      assume_jacobian_s=args.assume_jacobian_s, json_path=args.json)
        return 0
    if args.bench == "quality":
        from dqd_ray.bench import quality

        quality.run(env_ids=tuple(args.env) or ("QDAntBulletEnv-v0",),
                    presets=args.presets and tuple(args.presets), evaluations=args.evaluations,
                    seeds=tuple(args.seeds), sets=args.set, out=args.out,
                    json_path=args.json, robustness_episodes=args.robustness_episodes,
                    num_cpus=args.num_cpus)
        return 0
    if args.bench == "faults":
        from dqd_ray.bench import faults

        faults.run(scenarios=args.scenario or None, preset=args.preset,
                   iterations=args.iterations, sets=args.set, out=args.out,
                   json_path=args.json, timeout_s=args.timeout)
        return 0
    raise AssertionError(args.bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dqd-ray",
        description="Distributed differentiable quality diversity (CMA-MEGA) on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="random-policy episodes on a QD environment")
    demo.add_argument("--env", default="QDAntBulletEnv-v0")
    demo.add_argument("--episodes", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    def add_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field by dotted path, e.g. td3.batch_size=128")
        p.add_argument("--address", default=None,
                       help="join this Ray cluster (default: RAY_ADDRESS, else start a local Ray)")
        p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
        p.add_argument("--local-inprocess", action="store_true",
                       help="run every role in this process, without Ray (debugging)")

    from dqd_ray.config import PAPER_PRESETS, PRESETS

    preset_help = "one of: " + ", ".join(PRESETS)
    run = sub.add_parser("run", help="run an experiment")
    run.add_argument("--preset", default=None, help=preset_help)
    run.add_argument("--config", default=None, help="YAML config file")
    run.add_argument("--out", default=None, help="run directory (default: runs/<stamp>_...)")
    add_common(run)
    run.set_defaults(func=_cmd_run)

    config = sub.add_parser("config", help="print the resolved config as YAML")
    config.add_argument("--preset", default=None, help=preset_help)
    config.add_argument("--config", default=None, help="YAML config file")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path")
    config.set_defaults(func=_cmd_config)

    resume = sub.add_parser("resume", help="continue a run from its last intact checkpoint")
    resume.add_argument("run_dir")
    add_common(resume)
    resume.set_defaults(func=_cmd_resume)

    tune = sub.add_parser("tune", help="run a Ray Tune sweep from a sweep file",
                          description="Runs a hyperparameter sweep (see tune_configs/). "
                          "Everything is validated before any trial starts.")
    tune.add_argument("file", help="sweep YAML (e.g. tune_configs/quick_local.yaml)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a sweep field (tune_config.num_samples=4) or, for any "
                      "other key, the base config (iterations=20)")
    tune.add_argument("--address", default=None,
                      help="join this Ray cluster (default: RAY_ADDRESS, else start a local Ray)")
    tune.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    tune.add_argument("--resume", action="store_true",
                      help="continue an interrupted sweep (Tuner.restore, which unpickles "
                      "Tune's state: refused unless the experiment directory and everything "
                      "in it are yours and not writable by group or others)")
    tune.add_argument("--dry-run", action="store_true",
                      help="validate, print each trial's resource bundles, and stop")
    tune.set_defaults(func=_cmd_tune)

    show = sub.add_parser("show", help="summary table, archive heatmaps and QD curves of runs")
    show.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    show.add_argument("--out", default=None,
                      help="where the PNGs and tables go (default: RUN_DIR/show for one run, "
                      "runs/show_<stamp> for several)")
    show.set_defaults(func=_cmd_show)

    render = sub.add_parser("render", help="a GIF of an elite, re-run headless in its env")
    render.add_argument("run_dir", metavar="RUN_DIR")
    render.add_argument("--elite", default="best",
                        help="best, random or a row index of the archive (default: best)")
    render.add_argument("--measures", default=None, metavar="M1,M2,...",
                        help="the elite nearest these measures (instead of --elite)")
    render.add_argument("--out", default=None, help="GIF path (default: RUN_DIR/elite_ROW.gif)")
    render.add_argument("--steps", type=int, default=None,
                        help="episode steps (default: the run's episode length)")
    render.add_argument("--seed", type=int, default=None,
                        help="env seed (default: the seed the elite was archived with)")
    render.add_argument("--frame-every", type=int, default=2, help="steps per GIF frame")
    render.set_defaults(func=_cmd_render)

    robust = sub.add_parser(
        "robustness", help="re-evaluate every elite with new seeds: mean elite robustness")
    robust.add_argument("run_dir", metavar="RUN_DIR")
    robust.add_argument("--episodes", type=int, default=10, help="new-seed episodes per elite")
    robust.add_argument("--own-seeds", action="store_true",
                        help="one episode per elite with its archived seed (a check: gives 0)")
    robust.add_argument("--seed", type=int, default=12345, help="seed of the new env seeds")
    robust.add_argument("--out", default=None,
                        help="directory for robustness.json/.png (default: RUN_DIR)")
    robust.add_argument("--address", default=None,
                        help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    robust.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    robust.add_argument("--local-inprocess", action="store_true",
                        help="evaluate in this process, without Ray")
    robust.set_defaults(func=_cmd_robustness)

    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bsub = bench.add_subparsers(dest="bench", required=True)
    b_envs = bsub.add_parser("envs", help="env steps/s vs a bare pybullet loop")
    b_envs.add_argument("--steps", type=int, default=5000)
    b_envs.add_argument("--repeats", type=int, default=3)
    b_envs.add_argument("--json", default=None, help="write results to this JSON file")
    b_sph = bsub.add_parser("sphere", help="CMA-MEGA on the LP sphere with exact gradients")
    b_sph.add_argument("--dim", type=int, default=1000)
    b_sph.add_argument("--iterations", type=int, default=10000)
    b_sph.add_argument("--function", choices=["sphere", "rastrigin"], default="sphere")
    b_sph.add_argument("--seed", type=int, default=0)
    b_sph.add_argument("--selection-rule", choices=["mu", "filter"], default="mu")
    b_sph.add_argument("--map-elites", action="store_true", help="also run MAP-Elites")
    b_sph.add_argument("--cma-mae", action="store_true",
                       help="also run CMA-MAE (sep-CMA-ES) at the same budget")
    b_sph.add_argument("--report-every", type=int, default=1000)
    b_sph.add_argument("--json", default=None)
    b_sys = bsub.add_parser("system", help="rollout actors on Ray vs a single process")
    b_sys.add_argument("--workers", type=int, default=None)
    b_sys.add_argument("--env", default="QDAntBulletEnv-v0")
    b_sys.add_argument("--genomes", type=int, default=24)
    b_sys.add_argument("--envs-per-worker", type=int, default=4)
    b_sys.add_argument("--iterations", type=int, default=5)
    b_sys.add_argument("--json", default=None)
    b_lrn = bsub.add_parser(
        "learner", help="TD3 ensemble vs separate agents, and jacobian times")
    b_lrn.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b_lrn.add_argument("--env", default="QDAntBulletEnv-v0")
    b_lrn.add_argument("--batch-size", type=int, default=256)
    b_lrn.add_argument("--updates", type=int, default=100, help="updates per timing")
    b_lrn.add_argument("--repeats", type=int, default=3)
    b_lrn.add_argument("--genomes", type=int, nargs="+", default=[1, 8])
    b_lrn.add_argument("--states", type=int, nargs="+", default=[256, 4096, 65536])
    b_lrn.add_argument("--threads", type=int, nargs="+", default=[1],
                       help="torch intra-op thread counts, each measured in the same run "
                       "with its speed-up over the fewest (0: torch's default)")
    b_lrn.add_argument("--mode", nargs="+", choices=["eager", "compile", "cudagraphs"],
                       default=["eager"],
                       help="td3.update_mode(s) to time the ensemble's updates in, side by "
                       "side (eager always runs; cudagraphs needs --device cuda)")
    b_lrn.add_argument("--no-previous", action="store_true",
                       help="skip the previous jacobian method (the slow comparison)")
    b_lrn.add_argument("--compile", action="store_true",
                       help="the same as adding --mode compile")
    b_lrn.add_argument("--json", default=None)
    b_rol = bsub.add_parser(
        "rollout", help="the rollout path (env, policy, recording, resets) vs a bare "
        "pybullet loop, with the per-step time split")
    b_rol.add_argument("--env", action="append", default=[],
                       help="an env id (repeatable; default: all four)")
    b_rol.add_argument("--genomes", type=int, default=8,
                       help="random policies (episodes) per env, at least")
    b_rol.add_argument("--min-steps", type=int, default=4000,
                       help="more episodes until this many env steps per env")
    b_rol.add_argument("--repeats", type=int, default=3)
    b_rol.add_argument("--policies", nargs="+", choices=("random", "run"), default=["random"],
                       help="random: Xavier genomes (short episodes, many resets); run: one "
                       "Xavier genome and ES samples around it, what a CMA-MEGA run evaluates "
                       "first (long episodes)")
    b_rol.add_argument("--no-stream", action="store_true",
                       help="skip the pass through Ray (a rollout actor streaming to a "
                       "replay actor)")
    b_rol.add_argument("--json", default=None)
    b_co = bsub.add_parser(
        "coordinator", help="the coordinator's own work per iteration, with stand-ins for "
        "rollouts and gradients, and its profile")
    b_co.add_argument("--preset", default="cma_mega_td3_es")
    b_co.add_argument("--env", default="QDAntBulletEnv-v0")
    b_co.add_argument("--iterations", type=int, default=15)
    b_co.add_argument("--rollout-s", type=float, default=0.05,
                      help="seconds each stand-in evaluation sleeps")
    b_co.add_argument("--profile", type=int, default=0, metavar="N",
                      help="print cProfile's N heaviest functions")
    b_co.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b_co.add_argument("--json", default=None)
    b_it = bsub.add_parser(
        "iteration", help="a few iterations at the paper's settings, timed by phase, and "
        "the projected wall time of a whole run on W rollout CPUs and one learner")
    b_it.add_argument("--preset", default="cma_mega_td3_es")
    b_it.add_argument("--env", default="QDAntBulletEnv-v0")
    b_it.add_argument("--iterations", type=int, default=4)
    b_it.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (e.g. to shrink the iteration)")
    b_it.add_argument("--workers", type=int, nargs="+", default=[100],
                      help="rollout CPUs of the projection")
    b_it.add_argument("--episode-steps", type=int, default=1000,
                      help="steps per episode in the projection (1000: every episode full)")
    b_it.add_argument("--learner-json", default=None,
                      help="learner figures from `dqd-ray bench learner --json` (e.g. a GPU)")
    b_it.add_argument("--assume-updates-per-s", type=float, default=None,
                      help="projection what-if: the learner's critic updates per second")
    b_it.add_argument("--assume-jacobian-s", type=float, default=None,
                      help="projection what-if: seconds of one gradient jacobian")
    b_it.add_argument("--json", default=None)
    b_q = bsub.add_parser(
        "quality", help="presets at one evaluation budget and seeds: QD score, coverage, "
        "best fitness and robustness (mean and spread over seeds), and the curves")
    b_q.add_argument("--env", action="append", default=[],
                     help="an env id (repeatable; default: QD Ant)")
    b_q.add_argument("--presets", nargs="+", default=None, metavar="PRESET",
                     help="presets to compare (default: the paper's: "
                     + ", ".join(PAPER_PRESETS) + ")")
    b_q.add_argument("--evaluations", type=int, default=20000,
                     help="evaluation budget of every run")
    b_q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    b_q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="config override for every run (env.episode_length=200), or for "
                     "one preset's runs (me_es:algorithm.num_pairs=50)")
    b_q.add_argument("--robustness-episodes", type=int, default=10,
                     help="new-seed episodes per elite of each final archive (0: skip)")
    b_q.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray")
    b_q.add_argument("--out", default=None, help="work directory (default: runs/quality_<stamp>)")
    b_q.add_argument("--json", default=None)
    b_flt = bsub.add_parser(
        "faults", help="node loss, driver SIGKILL and checkpoint crashes on a local "
        "multi-node Ray cluster; reports what survived")
    b_flt.add_argument("--scenario", action="append",
                       choices=["nodes", "driver", "wait", "checkpoint"],
                       help="run only these (repeatable; default: all)")
    b_flt.add_argument("--preset", default="cma_mega_td3", help=preset_help)
    b_flt.add_argument("--iterations", type=int, default=12)
    b_flt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="extra config overrides for every run")
    b_flt.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    b_flt.add_argument("--timeout", type=float, default=300.0,
                       help="seconds any one wait may take before the bench fails")
    b_flt.add_argument("--json", default=None)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dqd_ray.config import ConfigError
    from dqd_ray.loop import RunFailed
    from dqd_ray.runtime import GPUUnavailableError, ResourceError
    from dqd_ray.state.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, CheckpointError, ResourceError,
            GPUUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:  # the run started and stopped: a role failed or hung
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
