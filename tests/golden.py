"""Golden trajectories: seeded episodes of every environment, recorded once.

``python tests/golden.py`` rewrites ``tests/data/golden_trajectories.npz``
from the current code; do that only for a change that is meant to alter what
the environments produce, and say so in the commit. ``test_golden.py``
compares the environments against the file exactly, but for the rewards: they
end in a sum and a dot product whose SIMD order differs between CPUs, so they
are compared to within reduction rounding (see ``REWARD_ATOL`` there).
"""

from __future__ import annotations

import pathlib

import numpy as np

PATH = pathlib.Path(__file__).parent / "data" / "golden_trajectories.npz"
# (seed, steps, action scale): one env object plays them in order, so resets
# after terminated, truncated and unfinished episodes are all covered; small
# actions keep Hopper and Walker up for a while, large ones are clipped.
EPISODES = ((0, 120, 1.2), (1, 400, 0.15), (2, 60, 0.5))
MAX_STEPS = 150  # truncation limit: some episodes are cut by it


def actions_for(seed: int, steps: int, scale: float, act_dim: int) -> np.ndarray:
    """The action sequence of one golden episode (PCG64: the same on every platform)."""
    return np.random.default_rng(1000 + seed).uniform(-scale, scale, (steps, act_dim))


def record(env_id: str) -> dict[str, np.ndarray]:
    from dqd_ray.envs import QDLocomotionEnv

    env = QDLocomotionEnv(env_id, max_episode_steps=MAX_STEPS)
    obs_l, rew_l, meas_l, step_l, flags_l, lens = [], [], [], [], [], []
    for seed, steps, scale in EPISODES:
        obs, _ = env.reset(seed=seed)
        obs_l.append(obs.copy())
        acts = actions_for(seed, steps, scale, env.action_space.shape[0])
        n = 0
        for a in acts:
            obs, r, term, trunc, info = env.step(a)
            n += 1
            obs_l.append(obs.copy())
            rew_l.append(r)
            meas_l.append(np.asarray(info["measures"], np.float64).copy())
            step_l.append(np.asarray(info["measures_step"], np.float64).copy())
            flags_l.append((term, trunc))
            if term or trunc:
                break
        lens.append(n)
    env.close()
    return {"obs": np.array(obs_l, np.float32), "reward": np.array(rew_l, np.float64),
            "measures": np.array(meas_l), "measures_step": np.array(step_l),
            "flags": np.array(flags_l, bool), "lengths": np.array(lens)}


def main() -> None:
    from dqd_ray.envs import ENV_IDS

    out = {}
    for env_id in ENV_IDS:
        for k, v in record(env_id).items():
            out[f"{env_id}/{k}"] = v
    PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(PATH, **out)
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
