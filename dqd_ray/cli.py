"""The ``dqd-ray`` command."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _cmd_demo(args: argparse.Namespace) -> int:
    from dqd_ray.envs import make_env

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


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "envs":
        from dqd_ray.bench import envs

        envs.run(steps=args.steps, repeats=args.repeats, json_path=args.json)
        return 0
    if args.bench == "sphere":
        from dqd_ray.bench import sphere

        sphere.run(dim=args.dim, iterations=args.iterations, function=args.function,
                   seed=args.seed, json_path=args.json, compare_map_elites=args.map_elites,
                   selection_rule=args.selection_rule, report_every=args.report_every)
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
    b_sph.add_argument("--report-every", type=int, default=1000)
    b_sph.add_argument("--json", default=None)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
