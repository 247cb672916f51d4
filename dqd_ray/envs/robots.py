"""Robot specifications of the four QD locomotion environments.

The numbers (power, per-joint gear overrides, foot lists, alive rules) follow
pybullet's locomotion robots, which the QDgym environments of the CMA-MEGA
(TD3, ES) paper build on; the QD metadata (archive dims, QD-score offsets,
reward thresholds) follows that paper.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

AliveFn = Callable[[float, float, np.ndarray], float]


@dataclasses.dataclass(frozen=True)
class RobotSpec:
    """Everything that distinguishes one QD locomotion environment.

    Attributes:
        env_id: Gymnasium id.
        xml: MJCF file under ``pybullet_data/mjcf``.
        power: Torque scale; a joint's torque is ``power * gear * action``.
        gear: Per-joint gear overrides (joint name -> gear); others use 100.
        obs_dim: Observation size.
        act_dim: Action size.
        foot_list: Links whose ground contacts enter the observation.
        measure_feet: Indices into ``foot_list`` whose contact fractions are the
            measures.
        measure_names: Human-readable measure names.
        alive: ``alive(z, pitch, feet_contact) -> +1 or -1``.
        terminates: Whether a negative alive bonus ends the episode.
        archive_dims: Default archive resolution per measure.
        qd_offset: QD-score offset (added to every objective before summing).
        reward_threshold: The maximum fitness of the paper's normalized QD
            score (QD score / (cells x (max - offset))); also gymnasium's
            reward threshold.
    """

    env_id: str
    xml: str
    power: float
    gear: dict[str, float]
    obs_dim: int
    act_dim: int
    foot_list: tuple[str, ...]
    measure_feet: tuple[int, ...]
    measure_names: tuple[str, ...]
    alive: AliveFn
    terminates: bool
    archive_dims: tuple[int, ...]
    qd_offset: float
    reward_threshold: float
    robot_name: str = "torso"

    @property
    def max_fitness(self) -> float:
        return self.reward_threshold

    @property
    def measure_dim(self) -> int:
        return len(self.measure_feet)


def _alive_ant(z: float, pitch: float, feet: np.ndarray) -> float:
    # The torso is a sphere of radius 0.25: scraping the ground is a fall.
    return 1.0 if z > 0.26 else -1.0


def _alive_upright(z: float, pitch: float, feet: np.ndarray) -> float:
    return 1.0 if z > 0.8 and abs(pitch) < 1.0 else -1.0


def _alive_cheetah(z: float, pitch: float, feet: np.ndarray) -> float:
    # Shins and thighs touching the ground count as a fall (no termination).
    # Indices into ("ffoot", "fshin", "fthigh", "bfoot", "bshin", "bthigh").
    touching = feet[1] or feet[2] or feet[4] or feet[5]
    return 1.0 if abs(pitch) < 1.0 and not touching else -1.0


ROBOTS: dict[str, RobotSpec] = {
    spec.env_id: spec
    for spec in (
        RobotSpec(
            env_id="QDAntBulletEnv-v0",
            xml="ant.xml",
            power=2.5,
            gear={},
            obs_dim=28,
            act_dim=8,
            foot_list=("front_left_foot", "front_right_foot", "left_back_foot", "right_back_foot"),
            measure_feet=(0, 1, 2, 3),
            measure_names=("front_left_foot", "front_right_foot", "back_left_foot",
                           "back_right_foot"),
            alive=_alive_ant,
            terminates=True,
            archive_dims=(6, 6, 6, 6),
            qd_offset=-374.702526595403,
            reward_threshold=2500.0,
        ),
        RobotSpec(
            env_id="QDHalfCheetahBulletEnv-v0",
            xml="half_cheetah.xml",
            power=0.90,
            gear={"bthigh": 120.0, "bshin": 90.0, "bfoot": 60.0,
                  "fthigh": 140.0, "fshin": 60.0, "ffoot": 30.0},
            obs_dim=26,
            act_dim=6,
            foot_list=("ffoot", "fshin", "fthigh", "bfoot", "bshin", "bthigh"),
            measure_feet=(0, 3),
            measure_names=("front_foot", "back_foot"),
            alive=_alive_cheetah,
            terminates=False,
            archive_dims=(32, 32),
            qd_offset=-2797.5195251991777,
            reward_threshold=3000.0,
        ),
        RobotSpec(
            env_id="QDHopperBulletEnv-v0",
            xml="hopper.xml",
            power=0.75,
            gear={},
            obs_dim=15,
            act_dim=3,
            foot_list=("foot",),
            measure_feet=(0,),
            measure_names=("foot",),
            alive=_alive_upright,
            terminates=True,
            archive_dims=(1000,),
            qd_offset=-362.0897231940748,
            reward_threshold=2500.0,
        ),
        RobotSpec(
            env_id="QDWalker2DBulletEnv-v0",
            xml="walker2d.xml",
            power=0.40,
            gear={"foot_joint": 30.0, "foot_left_joint": 30.0},
            obs_dim=22,
            act_dim=6,
            foot_list=("foot", "foot_left"),
            measure_feet=(0, 1),
            measure_names=("right_foot", "left_foot"),
            alive=_alive_upright,
            terminates=True,
            archive_dims=(32, 32),
            qd_offset=-67.16652198025106,
            reward_threshold=2500.0,
        ),
    )
}
