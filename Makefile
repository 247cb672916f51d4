# Everything a fresh machine needs: `make run` and `make test` create .venv,
# install the package with pinned constraints (torch CPU build), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install run test bench bench-quality mutation clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# A short local CMA-MEGA (TD3) run on QD Ant: a few minutes on 2 cores.
RUN_DIR ?= runs/local_ant_$(shell date +%Y%m%d-%H%M%S)
run: $(STAMP)
	$(BIN)/dqd-ray run --preset cma_mega_td3 --out $(RUN_DIR) \
		--set iterations=25 --set algorithm.batch_size=16 \
		--set td3.replay_capacity=200000 --set checkpoint.every=5 \
		--set logging.wandb=true --set logging.heatmap_every=5

# Lint first (rules in pyproject.toml: pyflakes, pycodestyle, import order, bugbear).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=25 -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/dqd-ray bench envs --json runs/bench_envs.json
	$(BIN)/dqd-ray bench system --json runs/bench_system.json
	$(BIN)/dqd-ray bench sphere --json runs/bench_sphere.json
	$(BIN)/dqd-ray bench rollout --policies random run --json runs/bench_rollout.json
	$(BIN)/dqd-ray bench learner --json runs/bench_learner.json
	$(BIN)/dqd-ray bench iteration --json runs/bench_iteration.json

# Every preset on QD Hopper at one evaluation budget, 2 seeds (about 100 minutes
# on 2 cores; docs/algorithms.md's comparison table).
bench-quality: $(STAMP)
	$(BIN)/dqd-ray bench quality --env QDHopperBulletEnv-v0 \
		--presets cma_mega_es cma_mega_td3_es pga_me me_es map_elites \
		sep_cma_mae lm_ma_mae openai_mae cma_mega_td3 cma_maega_td3 cma_maega_td3_es \
		--evaluations 5000 --seeds 0 1 --robustness-episodes 2 \
		--out runs/quality_hopper --json runs/bench_quality.json

# Mutation testing of the core modules against the fast test tier (see README).
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[mutation]'
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) runs mutants .pytest_cache
