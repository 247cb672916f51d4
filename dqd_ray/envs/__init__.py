"""QD locomotion environments (pybullet) and exact-gradient benchmark domains.

Importing this package registers the four environments with gymnasium; they
are also reachable as ``gymnasium.make("dqd_ray.envs:QDAntBulletEnv-v0")``.
"""

from __future__ import annotations

import gymnasium as gym

from dqd_ray.envs.benchmarks import LinearProjection
from dqd_ray.envs.locomotion import QDLocomotionEnv, load_robot
from dqd_ray.envs.robots import ROBOTS, RobotSpec

ENV_IDS: tuple[str, ...] = tuple(ROBOTS)


def make_env(env_id: str, **kwargs) -> QDLocomotionEnv:
    """Creates an environment directly (no gymnasium wrappers)."""
    return QDLocomotionEnv(env_id, **kwargs)


def env_metadata(env_id: str) -> RobotSpec:
    """Spaces, measures, archive dims and QD-score offset of an environment.

    Raises:
        ValueError: If the id is unknown.
    """
    if env_id not in ROBOTS:
        raise ValueError(f"unknown env id {env_id!r}; choose one of {sorted(ROBOTS)}")
    return ROBOTS[env_id]


for _env_id in ENV_IDS:
    if _env_id not in gym.registry:
        gym.register(
            id=_env_id,
            entry_point="dqd_ray.envs.locomotion:QDLocomotionEnv",
            kwargs={"env_id": _env_id},
            reward_threshold=ROBOTS[_env_id].reward_threshold,
            disable_env_checker=False,
        )

__all__ = ["ENV_IDS", "LinearProjection", "QDLocomotionEnv", "ROBOTS", "RobotSpec",
           "env_metadata", "load_robot", "make_env"]
