# pointsman: `make run` for the demo, `make test` for every test.
# Both install what is missing (Debian packages) first.

CARGO ?= cargo
# What building and testing need: protoc for etcd-client, etcd for the
# registry tests, curl and socat for the scripted tests; the HAProxy
# clients the runtime API is tried with (hatop in tmux, the exporter,
# haproxy itself to compare answers; haproxyadmin and haproxytool from
# PyPI, below).
BUILD_DEBS := protobuf-compiler libprotobuf-dev
TEST_DEBS  := etcd-server etcd-client curl socat bsdextrautils chromium python3-prometheus-client \
              hatop tmux prometheus-haproxy-exporter haproxy python3-pip openssl
TEST_PIP   := haproxyadmin==0.2.4 haproxytool==0.5.7
# The yardsticks for `make bench` and `make soak`.
BENCH_DEBS := haproxy nginx wrk python3 iproute2 etcd-server etcd-client
# `make demo` and `make soak`: etcd, and hey as the load (as in the seeds).
DEMO_DEBS  := etcd-server etcd-client hey curl
# The compose stack: debootstrap builds the offline base image; etcdctl,
# curl and python3 drive the scenarios; systemd-analyze checks the units.
COMPOSE_DEBS := debootstrap etcd-client curl python3 systemd
COMPOSE := compose/compose.sh

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

define install_missing
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

.PHONY: run test fuzz lint fmt deps-build deps-test deps-bench deps-demo deps-compose demo soak build bench bench-throughput bench-idle bench-scale bench-propagation check-config compose-images compose-up compose-down compose-test

## run: the demo (proxy on 127.0.0.1:8080, stats on 127.0.0.1:8404/stats)
run: deps-build
	$(CARGO) run --release -- demo

## test: install what is missing, then run every test of the workspace and
## the zero-downtime scenarios across the compose stack (needs Docker)
test: deps-build deps-test
	$(CARGO) build --workspace --all-targets
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi
	$(MAKE) compose-test

## demo: a rolling deploy and a blue/green switch under load (64 keep-alive
## clients) on two proxies and a throwaway etcd; prints the failed requests
demo: deps-build deps-demo build
	bash deploy/demo.sh demo

## soak: the same under 200 clients and 200,000 requests (hey -n 200000 -c 200)
soak: deps-build deps-demo build
	@mkdir -p bench/results
	OUT=bench/results/soak.txt bash deploy/demo.sh soak

## fuzz: every fuzz target (the registry and Consul parsers, the config
## file, runtime API lines, the takeover messages, client request heads)
## for FUZZ_SECONDS each, with the nightly toolchain; installs cargo-fuzz
## when missing. Inputs it grows stay in fuzz/grown/<target>/; crashes
## land in fuzz/artifacts/<target>/, which `make test` replays. See the
## FUZZING section of src/control/CONFIG.md.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := registry_entry consul_answers config_file runtime_line takeover_wire request_head request_path
fuzz: deps-build
	@$(CARGO) +nightly fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@cd fuzz && failed=""; for t in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; mkdir -p grown/$$t; \
	  $(CARGO) +nightly fuzz run -O -a -s none $$t grown/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=30 -print_final_stats=1 \
	    || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed (inputs in fuzz/artifacts/)"; exit 1; fi

## lint: formatting and clippy, warnings are errors
lint: deps-build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## bench: every benchmark (figures in bench/results/, summarised in BENCHMARKS.md)
bench: bench-throughput bench-idle bench-scale bench-propagation

## bench-throughput: req/s, latency, CPU and memory next to HAProxy and nginx
bench-throughput: deps-bench build
	bash bench/run.sh

## bench-idle: memory per idle keep-alive client connection (10,000 of them)
bench-idle: deps-bench build
	bash bench/idle_conns.sh

## bench-scale: routing table of 10,000 services x 10 instances
bench-scale: deps-build
	@mkdir -p bench/results
	$(CARGO) run --release --example table_scale | tee bench/results/table_scale.txt

## bench-propagation: etcd change -> first/last request, over 200 changes
bench-propagation: deps-bench build
	@mkdir -p bench/results
	$(CARGO) run --release --example propagation | tee bench/results/propagation.txt

build: deps-build
	$(CARGO) build --release

## compose-images: the stack's images, built from Debian's packages and the
## binary built here (no image registry needed)
compose-images: deps-build deps-compose build
	bash compose/offline-images.sh target/release/pointsman

## compose-up: the compose stack (etcd x3, lb0/lb1, api0-2); see compose/README.md
compose-up: compose-images
	$(COMPOSE) up -d
	@echo "proxies: http://127.0.0.1:5000 and :5001; stats: http://127.0.0.1:8404/stats and :8405/stats"

## compose-down: stop the stack and remove its containers, networks and volumes
compose-down:
	$(COMPOSE) --profile clients down -v --remove-orphans

## compose-test: the zero-downtime scenarios across the stack, under load.
## The images carry the debug binary `make test` has built already (one
## release build takes longer on two cores than every test together).
compose-test: deps-build deps-compose
	$(CARGO) build --bin pointsman
	bash compose/offline-images.sh target/debug/pointsman
	bash deploy/systemd/verify.sh target/debug/pointsman
	bash compose/test.sh target/debug/pointsman

check-config: build
	./target/release/pointsman check --config examples/demo.toml

deps-build:
	$(call install_missing,$(BUILD_DEBS))

deps-test:
	$(call install_missing,$(TEST_DEBS))
	@python3 -c 'import haproxyadmin, haproxytool' 2>/dev/null || { \
	  echo "installing: $(TEST_PIP)"; \
	  python3 -m pip install -q $(TEST_PIP) 2>/dev/null || \
	  python3 -m pip install -q --break-system-packages $(TEST_PIP); \
	}

deps-bench:
	$(call install_missing,$(BENCH_DEBS))

deps-demo:
	$(call install_missing,$(DEMO_DEBS))

deps-compose:
	$(call install_missing,$(COMPOSE_DEBS))
	@command -v docker >/dev/null || { echo "the compose stack needs a Docker engine: apt-get install docker.io, then start it"; exit 1; }
	@if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; \
	fi
