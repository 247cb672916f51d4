"""The compiled QD locomotion step (dqd_ray/envs/_bullet_step.c) on real
pybullet: it is built by the install, it steps pybullet's own clients, and
every number it gives equals the Python path's bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pybullet
import pytest

from dqd_ray.envs import ENV_IDS, QDLocomotionEnv, compiled


def _episodes(env, compiled_step: bool, episodes: int = 4, steps: int = 250) -> list[bytes]:
    """Everything observable of a few episodes (full and small random actions:
    falls, terminations and resets on every robot), as bytes."""
    env.load()
    assert env.compiled, "the compiled step did not attach"
    if not compiled_step:
        env._stepper = None
    rng = np.random.default_rng(7)
    out = []
    for ep in range(episodes):
        obs, info = env.reset(seed=ep)
        out += [obs.tobytes(), info["measures"].tobytes()]
        for _ in range(steps):
            a = rng.uniform(-1, 1, env.action_space.shape) * (1.0 if ep % 2 else 0.3)
            obs, r, term, trunc, info = env.step(a)
            out += [obs.tobytes(), np.array([r, term, trunc, env.obs_finite]).tobytes(),
                    info["measures"].tobytes(), info["measures_step"].tobytes(),
                    np.array([info["reward_alive"], info["reward_progress"],
                              info["reward_electricity"],
                              info["reward_joints_at_limit"]]).tobytes()]
            if term or trunc:
                break
    env.close()
    return out


def test_the_install_built_the_compiled_step_and_it_attaches():
    st = compiled.status()
    assert st == {"compiled": True, "reason": None}, st
    env = QDLocomotionEnv("QDHopperBulletEnv-v0")
    env.load()
    assert env.compiled and env._stepper is not None
    env.close()
    assert not env.compiled and env._stepper is None
    env.load()  # a closed env loads its robot again, and steps in C again
    assert env.compiled
    env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_compiled_step_gives_the_python_paths_numbers_bit_for_bit(env_id):
    fast = _episodes(QDLocomotionEnv(env_id, max_episode_steps=200), compiled_step=True)
    slow = _episodes(QDLocomotionEnv(env_id, max_episode_steps=200), compiled_step=False)
    assert len(fast) == len(slow) > 100
    assert next((i for i, (a, b) in enumerate(zip(fast, slow)) if a != b), None) is None


def test_compiled_step_works_on_pybullets_own_client():
    """The C step and pybullet's Python API see one simulation: a pose reset
    through Python shows in the next compiled observation, and rendering (a
    Python call) sees where the compiled steps took the robot."""
    env = QDLocomotionEnv("QDAntBulletEnv-v0", render_mode="rgb_array", render_width=32,
                          render_height=24)
    env.reset(seed=0)
    assert env.compiled
    r = env._robot
    before = pybullet.getBasePositionAndOrientation(r.body, physicsClientId=r.client)[0]
    for _ in range(20):
        env.advance(np.ones(8))
    after = pybullet.getBasePositionAndOrientation(r.body, physicsClientId=r.client)[0]
    assert before != after
    joint = env._joint_list[0]
    pybullet.resetJointState(r.body, joint, 0.3, 0.0, physicsClientId=r.client)
    obs = env._calc_state()
    rel = (0.3 - env._joint_mid[0]) / env._joint_half[0]
    assert obs[8] == np.float32(rel)
    assert env.render().shape == (24, 32, 3)
    env.close()


def test_a_stepper_that_disagrees_with_python_is_refused(monkeypatch, recwarn):
    """The check on load: a stepper built with wrong torques (a stand-in for a
    pybullet build whose C API does not match) is not used, the env steps in
    Python, and a warning says why."""
    real = compiled.make_stepper

    def wrong_torques(env):
        scale = env._robot.torque_scale.copy()
        env._robot.torque_scale *= 2.0
        try:
            return real(env)
        finally:
            env._robot.torque_scale = scale

    monkeypatch.setattr(compiled, "make_stepper", wrong_torques)
    saved = dict(compiled._state)
    try:
        env = QDLocomotionEnv("QDHopperBulletEnv-v0")
        env.load()
        assert not env.compiled and env._stepper is None
        assert any("differs from pybullet's Python API" in str(w.message) for w in recwarn)
        assert "differs" in compiled.status()["reason"]
        obs, _ = env.reset(seed=0)
        obs2, *_ = env.step(np.zeros(3))
        assert obs.shape == obs2.shape == (15,)
        env.close()
    finally:
        compiled._state.clear()
        compiled._state.update(saved)


def test_stepper_rejects_buffers_of_the_wrong_kind():
    env = QDLocomotionEnv("QDHopperBulletEnv-v0")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="obs must be a writable float32 array of 15"):
        env._stepper.state(np.zeros(15, np.float64), float("nan"))
    with pytest.raises(ValueError, match="action must be float64 of 3"):
        env._stepper.advance(np.zeros(3, np.float32), np.zeros(15, np.float32), 0.0)
    env.close()


def test_the_compiled_step_can_be_turned_off():
    code = ("from dqd_ray.envs import QDLocomotionEnv, compiled\n"
            "e = QDLocomotionEnv('QDHopperBulletEnv-v0'); e.load()\n"
            "print(e.compiled, compiled.status()['reason'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "DQD_RAY_COMPILED_STEP": "0"})
    assert out.returncode == 0, out.stderr
    assert "False turned off by DQD_RAY_COMPILED_STEP=0" in out.stdout


def test_the_install_goes_on_without_a_c_compiler(tmp_path):
    """The extension is optional: where no compiler can run, the package (as
    `make install` builds it, with build isolation) still builds, without the
    extension, and the envs fall back to Python."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "dqd_ray", src / "dqd_ray",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler")}
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
         str(tmp_path / "wheels"), str(src)],
        capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "wheels").glob("dqd_ray-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "dqd_ray/envs/compiled.py" in names
    assert not [n for n in names if n.endswith(".so")], names
