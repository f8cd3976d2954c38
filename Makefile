# worldloop — two commands: `make demo` and `make test`. Both set up the environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch: this machine kind keeps its wheel in /opt/wheels (see STACK.md). Elsewhere,
# point TORCH_FIND_LINKS at a folder with a torch 2.13 CPU wheel, or UV_INDEX at a CPU index.
TORCH_FIND_LINKS ?= $(wildcard /opt/wheels)
UV_FLAGS := --python $(BIN)/python --compile-bytecode $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS))
LAKE    ?= ./lake
LANDING ?= ./landing
CONFIG  ?= default
TURNS   ?= 1
WORLD   ?= carracing
export SDL_VIDEODRIVER := dummy
# MuJoCo (the Meta-World arm) renders on the CPU through OSMesa. (No comment after a value: make keeps the spaces.)
export MUJOCO_GL := osmesa
export PYOPENGL_PLATFORM := osmesa
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test test-all bench-curate bench-curate-scale bench-world-model bench-train-step bench-serve ablate-oversampling serve prefect-server deploy worker clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@# Debian's OSMesa: MuJoCo's CPU renderer (EGL needs a GPU). Root installs it; others are told how.
	@ldconfig -p | grep -q libOSMesa || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 >/dev/null; \
	  else echo "install Debian's libosmesa6 (apt-get install libosmesa6) for the Meta-World arm" >&2; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install $(UV_FLAGS) -q "torch==2.13.0"    # first, so nothing pulls a CUDA build
	$(BIN)/uv pip install $(UV_FLAGS) -q -r requirements.txt
	$(BIN)/uv pip install $(UV_FLAGS) -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)   ## one full turn on the embedded default; WORLD=... LAKE=... LANDING=... TURNS=... CONFIG=...
	@# a Ray cluster with Serve that outlives make (idempotent; `worldloop down` or `make clean` stops it)
	$(BIN)/worldloop up
	$(BIN)/worldloop run --world $(WORLD) --turns $(TURNS) --config $(CONFIG) --lake $(LAKE) --landing $(LANDING)

test: $(STAMP)   ## the default suite (skips `slow` and `gpu`)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu"

bench-curate: $(STAMP)  ## curate vs a script and the decode limit on 640x480 MCAP + AV1 LeRobot logs, peak RSS, sampler (last line: JSON)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench_curate $(ARGS)

bench-curate-scale: $(STAMP)  ## the same with 16 one-minute MCAP logs, throughput and memory only
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench_curate --mcap-logs 16 --mcap-seconds 60 --lerobot-sets 0 --no-sampler --no-per-format $(ARGS)

bench-world-model: $(STAMP)  ## world model fidelity, speed, neural-sim ranking vs baselines, both worlds; docs/world_model_strip.png (last line: JSON)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench_world_model --strip docs/world_model_strip.png $(ARGS)

ablate-oversampling: $(STAMP)  ## uniform vs clip-weighted policy windows on a copy of LAKE (after make demo)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.ablate_oversampling --lake $(LAKE) --config $(CONFIG) $(ARGS)

bench-train-step: $(STAMP)  ## training-step throughput, FLOPs and MFU of each model, fp32 vs bf16 (ARGS="--preset gpu --device cuda --ceiling 8192" on a GPU; last line: JSON)
	$(BIN)/python -m benchmarks.bench_train_step --dtype float32 bfloat16 $(ARGS)

bench-serve: $(STAMP)  ## /act on Ray Serve vs FastAPI+uvicorn: p50/p99 at 1 client, rps at 16, failures during a rollout (last line: JSON)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench_serve $(ARGS)

serve: $(STAMP)  ## keep the champion's endpoint up
	$(BIN)/worldloop serve --lake $(LAKE) --landing $(LANDING)

prefect-server: $(STAMP)  ## a real Prefect server with the UI on http://127.0.0.1:4200 (see infra/)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

deploy: $(STAMP)  ## register prefect.yaml's deployments with the server at PREFECT_API_URL
	$(BIN)/prefect work-pool create worldloop-process --type process --overwrite
	WORLDLOOP_HOME=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all

worker: $(STAMP)
	$(BIN)/prefect worker start --pool worldloop-process

clean:  ## stop what `worldloop up` started, then remove the lake, the landing zone and .worldloop
	-[ ! -x $(BIN)/worldloop ] || $(BIN)/worldloop down
	rm -rf $(LAKE) $(LANDING) .worldloop
