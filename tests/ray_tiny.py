"""Tiny settings of every preset for the Ray system tests (shared by
test_ray_system.py and test_ray_presets.py)."""

from __future__ import annotations

from dqd_ray.config import build_config

PRESET_TINY = {
    "cma_mega_td3": ["algorithm.batch_size=4"], "cma_mega_td3_es": ["algorithm.batch_size=4"],
    "cma_mega_es": ["algorithm.batch_size=4"], "cma_maega_td3": ["algorithm.batch_size=4"],
    "pga_me": ["algorithm.iso_batch_size=3", "algorithm.pg_batch_size=3",
               "algorithm.pg_steps=2", "algorithm.pg_states=16"],
    "map_elites": ["algorithm.batch_size=6"],
    # Two ES steps per run: iterations 1-2 exploit, 3 explores from a drawn cell.
    "me_es": ["algorithm.num_pairs=3", "algorithm.consecutive_steps=2",
              "algorithm.obs_collect_prob=0.5"],
    "cma_maega_td3_es": ["algorithm.batch_size=4"],
    "sep_cma_mae": ["algorithm.num_emitters=2", "algorithm.batch_size=4"],
    "lm_ma_mae": ["algorithm.num_emitters=2", "algorithm.batch_size=4"],
    "openai_mae": ["algorithm.num_emitters=2", "algorithm.batch_size=4"],
}
COMMON = [
    "env.episode_length=50", "td3.batch_size=32", "metrics.robustness_episodes=2",
    "td3.critic_hidden_sizes=[32,32]", "td3.train_steps_per_iteration=5",
    "td3.jacobian_states=32", "td3.learning_starts=32", "td3.replay_capacity=20000",
    "es.num_samples=4", "resources.num_rollout_workers=2", "resources.envs_per_worker=2",
    "checkpoint.every=2", "logging.progress_bar=false",
    # The best elite's GIF is checked where it is made on purpose
    # (test_wandb_offline_run, test_results.py, test_durability.py).
    "logging.final_gif=false",
]
TINY = COMMON + PRESET_TINY["cma_mega_td3"]


def sets(*extra, preset: str = "cma_mega_td3"):
    out = []
    for s in [*COMMON, *PRESET_TINY[preset], *extra]:
        out += ["--set", s]
    return out


def _tiny_cfg(*extra, preset: str = "cma_mega_td3"):
    # Sync learners on one torch thread: a Ray run and an in-process run compared
    # exactly do the same float operations in the same order (torch splits large
    # reductions between its threads, and in process it has one per core).
    return build_config(preset, sets=[*COMMON, *PRESET_TINY[preset],
                                      "resources.learner_mode=sync",
                                      "resources.torch_threads=1", *extra])
