"""QD locomotion environments written directly on pybullet's API.

Dynamics, observations and rewards follow pybullet's locomotion environments
(the base of the QDgym tasks); measures are the fraction of steps each foot
touched the ground. Episodes end by truncation at ``max_episode_steps``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import gymnasium as gym
import numpy as np
import pybullet
import pybullet_data

from dqd_ray.envs import compiled
from dqd_ray.envs.robots import ROBOTS, RobotSpec

TIMESTEP = 0.0165 / 4
FRAME_SKIP = 4
DT = TIMESTEP * FRAME_SKIP
GRAVITY = 9.8
SOLVER_ITERATIONS = 5
ELECTRICITY_COST = -2.0
STALL_TORQUE_COST = -0.1
JOINTS_AT_LIMIT_COST = -0.1
TARGET_X, TARGET_Y = 1e3, 0.0
DEFAULT_GEAR = 100.0


@dataclasses.dataclass
class LoadedRobot:
    """Handles to a robot loaded into one physics client."""

    client: int
    floor: int
    body: int
    joint_ids: np.ndarray  # controlled joints, in action order
    torque_scale: np.ndarray  # power * gear per controlled joint
    joint_mid: np.ndarray
    joint_half_range: np.ndarray
    part_link_ids: list[int]  # link indices of all parts but the base
    base_is_part: bool  # whether the base counts as a part
    torso_link: int
    feet_links: list[int]
    state_id: int


def load_robot(spec: RobotSpec) -> LoadedRobot:
    """Creates a DIRECT physics client with the stadium floor and the robot.

    Args:
        spec: The robot to load.

    Returns:
        Handles to the loaded robot, with a saved initial state to restore on
        every reset.
    """
    cid = pybullet.connect(pybullet.DIRECT)
    kw = {"physicsClientId": cid}
    pybullet.resetSimulation(**kw)
    pybullet.setPhysicsEngineParameter(deterministicOverlappingPairs=1, **kw)
    pybullet.setGravity(0, 0, -GRAVITY, **kw)
    pybullet.setDefaultContactERP(0.9, **kw)
    pybullet.setPhysicsEngineParameter(
        fixedTimeStep=DT, numSolverIterations=SOLVER_ITERATIONS, numSubSteps=FRAME_SKIP, **kw
    )
    data = pybullet_data.getDataPath()
    floor = pybullet.loadSDF(os.path.join(data, "plane_stadium.sdf"), **kw)[0]
    pybullet.changeDynamics(floor, -1, lateralFriction=0.8, restitution=0.5, **kw)
    flags = pybullet.URDF_USE_SELF_COLLISION | pybullet.URDF_USE_SELF_COLLISION_EXCLUDE_ALL_PARENTS
    body = pybullet.loadMJCF(os.path.join(data, "mjcf", spec.xml), flags=flags, **kw)[0]

    # Parts keyed by link name, the base under the robot name until a link of
    # that name replaces it (as pybullet's robot loader does).
    parts: dict[str, int] = {}
    joint_ids, gears, lows, highs = [], [], [], []
    for j in range(pybullet.getNumJoints(body, **kw)):
        info = pybullet.getJointInfo(body, j, **kw)
        joint_name, joint_type, link_name = info[1].decode(), info[2], info[12].decode()
        parts[link_name] = j
        if j == 0 and spec.robot_name not in parts:
            parts[spec.robot_name] = -1
        if joint_type == pybullet.JOINT_FIXED:
            continue
        # Free every motor: controlled joints are torque driven, the planar
        # root joints ("ignore*") are passive.
        pybullet.setJointMotorControl2(body, j, pybullet.VELOCITY_CONTROL, force=0, **kw)
        if joint_name.startswith("ignore"):
            continue
        joint_ids.append(j)
        gears.append(spec.gear.get(joint_name, DEFAULT_GEAR))
        lows.append(info[8])
        highs.append(info[9])
    if len(joint_ids) != spec.act_dim:
        raise RuntimeError(f"{spec.xml}: found {len(joint_ids)} motors, expected {spec.act_dim}")
    lows_a, highs_a = np.array(lows), np.array(highs)
    state_id = pybullet.saveState(**kw)
    return LoadedRobot(
        client=cid,
        floor=floor,
        body=body,
        joint_ids=np.array(joint_ids),
        torque_scale=spec.power * np.array(gears),
        joint_mid=0.5 * (lows_a + highs_a),
        joint_half_range=0.5 * (highs_a - lows_a),
        part_link_ids=[i for i in parts.values() if i >= 0],
        base_is_part=-1 in parts.values(),
        torso_link=parts[spec.robot_name],
        feet_links=[parts[f] for f in spec.foot_list],
        state_id=state_id,
    )


class QDLocomotionEnv(gym.Env):
    """A pybullet robot that should walk forward; measures are foot contacts.

    Args:
        env_id: One of ``dqd_ray.envs.ENV_IDS``.
        max_episode_steps: Episodes are truncated (never terminated) here.
        render_mode: ``None`` or ``"rgb_array"``.
        render_width: Frame width in pixels.
        render_height: Frame height in pixels.

    Raises:
        ValueError: On an unknown id, a bad step limit or render mode.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(round(1 / DT))}

    def __init__(
        self,
        env_id: str = "QDAntBulletEnv-v0",
        *,
        max_episode_steps: int = 1000,
        render_mode: str | None = None,
        render_width: int = 320,
        render_height: int = 240,
    ):
        if env_id not in ROBOTS:
            raise ValueError(f"unknown env id {env_id!r}; choose one of {sorted(ROBOTS)}")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.spec_robot = ROBOTS[env_id]
        spec = self.spec_robot
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.render_size = (render_width, render_height)
        self.observation_space = gym.spaces.Box(-5.0, 5.0, (spec.obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (spec.act_dim,), np.float32)
        self.measure_dim = spec.measure_dim
        self.measure_names = spec.measure_names
        self.measure_ranges = tuple((0.0, 1.0) for _ in range(spec.measure_dim))
        self.archive_dims = spec.archive_dims
        self.qd_offset = spec.qd_offset
        self.reward_threshold = spec.reward_threshold
        self._robot: LoadedRobot | None = None
        self._needs_reset = True
        # Arrays updated in place (the compiled step holds them): this step's
        # feet contacts, the previous step's, and 0.1 x the joint speeds.
        self._feet_contact = np.zeros(len(spec.foot_list), np.float32)
        self._feet_prev = np.zeros(len(spec.foot_list), np.float32)
        self._joint_speeds = np.zeros(spec.act_dim, np.float32)
        self._stepper = None  # the compiled step, when load() could attach it
        self.compiled = False  # whether this env steps in C (dqd_ray.envs.compiled)
        self._measure_counts = np.zeros(spec.measure_dim)
        self._measure_idx = np.array(spec.measure_feet)
        self.obs_finite = True  # whether the last observation was finite
        self._t = 0
        self.episode_return = 0.0

    # -- physics helpers -------------------------------------------------

    def _calc_state(self) -> np.ndarray:
        if self._stepper is not None:
            obs = np.empty(self.spec_robot.obs_dim, np.float32)
            init = math.nan if self._initial_z is None else self._initial_z
            out = self._stepper.state(obs, init)
            self._take_state(out)
            return obs
        return self._calc_state_py()

    def _take_state(self, out) -> None:
        _, self._pitch, x, y, self._initial_z, self._joints_at_limit, self.obs_finite = out
        self._body_xy = (x, y)

    def _calc_state_py(self) -> np.ndarray:
        # Scalars are Python floats (IEEE doubles, the same arithmetic numpy
        # does elementwise) gathered into one float32 array: per step, a few
        # numpy calls instead of a dozen on tiny arrays.
        r, cid = self._robot, self._robot.client
        joints = pybullet.getJointStates(r.body, self._joint_list, physicsClientId=cid)

        # Body x, y: mean over all parts; z, orientation and speed: the torso.
        states = pybullet.getLinkStates(r.body, self._part_list, physicsClientId=cid)
        sx = sy = 0.0
        for s in states:
            sx += s[0][0]
            sy += s[0][1]
        base_pos, base_orn = pybullet.getBasePositionAndOrientation(r.body, physicsClientId=cid)
        n_parts = len(states)
        if r.base_is_part:
            sx += base_pos[0]
            sy += base_pos[1]
            n_parts += 1
        x, y = sx / n_parts, sy / n_parts
        if r.torso_link < 0:
            t_pos, t_orn = base_pos, base_orn
            t_vel = pybullet.getBaseVelocity(r.body, physicsClientId=cid)[0]
        else:
            s = pybullet.getLinkState(r.body, r.torso_link, computeLinkVelocity=1,
                                      physicsClientId=cid)
            t_pos, t_orn, t_vel = s[0], s[1], s[6]
        z = t_pos[2]
        self._body_xy = (x, y)
        if self._initial_z is None:
            self._initial_z = z
        roll, pitch, yaw = pybullet.getEulerFromQuaternion(t_orn)
        self._pitch = pitch
        angle = math.atan2(TARGET_Y - y, TARGET_X - x) - yaw
        c, s_ = math.cos(yaw), math.sin(yaw)
        # Rotate the world-frame speed into the torso's yaw frame.
        vx = c * t_vel[0] + s_ * t_vel[1]
        vy = -s_ * t_vel[0] + c * t_vel[1]
        vals = [z - self._initial_z, math.sin(angle), math.cos(angle),
                0.3 * vx, 0.3 * vy, 0.3 * t_vel[2], roll, pitch]
        # Joints: position relative to the range's middle, scaled to [-1, 1], and 0.1 x speed.
        for js, mid, half in zip(joints, self._joint_mid, self._joint_half):
            vals.append((js[0] - mid) / half)
            vals.append(0.1 * js[1])
        # Feet contacts in the observation are those of the previous step.
        vals.extend(self._feet_contact.tolist())
        obs = np.array(vals, np.float32)
        rel = obs[8:8 + 2 * len(joints)]  # float32, before the observation's clip
        self._joint_speeds[:] = rel[1::2]
        self._joints_at_limit = int(np.count_nonzero(np.abs(rel[0::2]) > 0.99))
        np.maximum(obs, -5.0, out=obs)
        np.minimum(obs, 5.0, out=obs)
        self.obs_finite = bool(np.isfinite(obs).all())
        return obs

    def _physics_step(self, a: np.ndarray) -> np.ndarray:
        """Torques, one step, the observation (with the previous step's feet
        contacts), then the new contacts; the previous ones stay in
        ``_feet_prev``. In C when the env is compiled, the same numbers."""
        if self._stepper is not None:
            obs = np.empty(self.spec_robot.obs_dim, np.float32)
            init = math.nan if self._initial_z is None else self._initial_z
            self._take_state(self._stepper.advance(a, obs, init))
            return obs
        r = self._robot
        cid = r.client
        pybullet.setJointMotorControlArray(
            r.body, self._joint_list, pybullet.TORQUE_CONTROL,
            forces=(r.torque_scale * a).tolist(), physicsClientId=cid,
        )
        pybullet.stepSimulation(physicsClientId=cid)
        obs = self._calc_state_py()
        self._feet_prev[:] = self._feet_contact
        self._update_contacts()
        return obs

    def _potential(self) -> float:
        x, y = self._body_xy
        return -math.hypot(TARGET_Y - y, TARGET_X - x) / DT

    def _update_contacts(self) -> None:
        r = self._robot
        contacts = pybullet.getContactPoints(r.body, r.floor, physicsClientId=r.client)
        touching = {c[3] for c in contacts}
        self._feet_contact[:] = [link in touching for link in r.feet_links]

    # -- gymnasium API ---------------------------------------------------

    def load(self) -> None:
        """Loads the robot into its physics client now (the first ``reset``
        does it otherwise): a worker pays for it while it starts, not in its
        first evaluation."""
        if self._robot is None:
            self._robot = r = load_robot(self.spec_robot)
            # Plain lists: pybullet reads them faster than numpy arrays.
            self._joint_list = [int(j) for j in r.joint_ids]
            self._part_list = [int(i) for i in r.part_link_ids]
            self._joint_mid = r.joint_mid.tolist()
            self._joint_half = r.joint_half_range.tolist()
            self._all_feet_measured = list(self._measure_idx) == list(range(len(r.feet_links)))
            self._attach_compiled()

    def _attach_compiled(self) -> None:
        """Steps in C from now on if the compiled step attaches and, from the
        saved initial state, its first two steps give the Python path's
        numbers bit for bit; otherwise stays on the Python path."""
        stepper = compiled.make_stepper(self)
        if stepper is None:
            return
        r = self._robot
        a = np.linspace(-1.0, 1.0, self.spec_robot.act_dim)
        runs = []
        for use in (None, stepper):
            self._stepper = use
            pybullet.restoreState(r.state_id, physicsClientId=r.client)
            self._feet_contact[:] = 0.0
            self._initial_z = None
            trace = [self._calc_state()]
            for sign in (1.0, -1.0):
                trace.append(self._physics_step(sign * a))
                trace += [self._feet_contact.copy(), self._feet_prev.copy(),
                          self._joint_speeds.copy(), np.array(
                              [self._pitch, *self._body_xy, self._initial_z,
                               self._joints_at_limit, self.obs_finite])]
            runs.append(trace)
        self._stepper = None
        pybullet.restoreState(r.state_id, physicsClientId=r.client)
        self._feet_contact[:] = 0.0
        if not all(x.tobytes() == y.tobytes() for x, y in zip(*runs)):
            compiled.fall_back(f"the compiled step of {self.spec_robot.env_id} differs from "
                               "pybullet's Python API on its first steps")
            return
        self._stepper, self.compiled = stepper, True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.load()
        r, kw = self._robot, {"physicsClientId": self._robot.client}
        pybullet.restoreState(r.state_id, **kw)
        for j in r.joint_ids:
            q = float(self.np_random.uniform(-0.1, 0.1))
            pybullet.resetJointState(r.body, int(j), targetValue=q, targetVelocity=0.0, **kw)
            pybullet.setJointMotorControl2(r.body, int(j), pybullet.VELOCITY_CONTROL, force=0, **kw)
        self._feet_contact[:] = 0.0
        self._feet_prev[:] = 0.0
        self._measure_counts[:] = 0.0
        self._initial_z = None
        self._t = 0
        self.episode_return = 0.0
        obs = self._calc_state()
        self._last_potential = self._potential()
        self._needs_reset = False
        info = {"measures": np.zeros(self.measure_dim), "measures_step": np.zeros(self.measure_dim)}
        return obs, info

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError(
                "step() called on a finished (terminated or truncated) or never-reset "
                "episode; call reset() first"
            )
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.spec_robot.act_dim,):
            raise ValueError(
                f"action must have shape ({self.spec_robot.act_dim},), got {a.shape}"
            )
        if not np.isfinite(a).all():
            raise ValueError(f"action contains non-finite values: {a}")
        a = np.minimum(np.maximum(a, -1.0), 1.0)
        obs, reward, terminated, truncated, step_measures = self.advance(a)
        info = {
            "measures_step": step_measures,
            "measures": self._measure_counts / self._t,
            "reward_alive": self._alive,
            "reward_progress": self._progress,
            "reward_electricity": self._electricity,
            "reward_joints_at_limit": self._limits,
        }
        return obs, reward, terminated, truncated, info

    def advance(self, a: np.ndarray):
        """:meth:`step` for callers that checked the action themselves (the
        rollout worker): ``a`` float64 of shape ``(act_dim,)``, finite, within
        [-1, 1]. Same physics and numbers as ``step``, without the checks and
        the info dict.

        Returns:
            ``(obs, reward, terminated, truncated, measures_step)``; the running
            measures are :meth:`measures`, the terms of the reward are
            ``_alive``, ``_progress``, ``_electricity`` and ``_limits``.
        """
        obs = self._physics_step(a)
        spec = self.spec_robot
        # Alive from the contacts before this step's update, as observed.
        alive = spec.alive(float(obs[0]) + self._initial_z, self._pitch, self._feet_prev)
        terminated = spec.terminates and alive < 0
        if not self.obs_finite:
            terminated = True
        potential = self._potential()
        progress = potential - self._last_potential
        self._last_potential = potential

        n = len(a)
        electricity = ELECTRICITY_COST * float(np.abs(a * self._joint_speeds).sum()) / n
        electricity += STALL_TORQUE_COST * float(np.dot(a, a)) / n
        limits = JOINTS_AT_LIMIT_COST * self._joints_at_limit
        reward = alive + progress + electricity + limits
        self._alive, self._progress, self._electricity, self._limits = (
            alive, progress, electricity, limits)

        self._t += 1
        self.episode_return += reward
        step_measures = (self._feet_contact if self._all_feet_measured
                         else self._feet_contact[self._measure_idx]).astype(np.float64)
        self._measure_counts += step_measures
        truncated = (not terminated) and self._t >= self.max_episode_steps
        self._needs_reset = bool(terminated or truncated)
        return obs, float(reward), bool(terminated), bool(truncated), step_measures

    def measures(self) -> np.ndarray:
        """The running measures: the fraction of this episode's steps with each
        measured foot on the ground."""
        return self._measure_counts / max(self._t, 1)

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if self._robot is None:
            raise RuntimeError("render() needs reset() first")
        kw = {"physicsClientId": self._robot.client}
        x, y = getattr(self, "_body_xy", (0.0, 0.0))
        width, height = self.render_size
        view = pybullet.computeViewMatrixFromYawPitchRoll(
            cameraTargetPosition=[x, y, 0.5], distance=3.0, yaw=0.0, pitch=-20.0,
            roll=0.0, upAxisIndex=2, **kw,
        )
        proj = pybullet.computeProjectionMatrixFOV(
            fov=60.0, aspect=width / height, nearVal=0.1, farVal=100.0, **kw
        )
        _, _, rgba, _, _ = pybullet.getCameraImage(
            width, height, viewMatrix=view, projectionMatrix=proj,
            renderer=pybullet.ER_TINY_RENDERER, **kw,
        )
        return np.asarray(rgba, np.uint8).reshape(height, width, 4)[:, :, :3].copy()

    def close(self):
        self._stepper, self.compiled = None, False
        if self._robot is not None:
            try:
                pybullet.disconnect(physicsClientId=self._robot.client)
            except pybullet.error:
                pass
            self._robot = None
        self._needs_reset = True
