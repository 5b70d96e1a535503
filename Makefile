# containerflip: the commands the README names. `make test` is the one
# test command; .ci/run runs it plus formatting and lints.

# The host's own target: the gnu target with crt-static links statically.
STATIC_TARGET ?= $(shell rustc -vV | sed -n 's/^host: //p')
STATIC_BIN := target/$(STATIC_TARGET)/release/containerflip

.PHONY: test test-rust test-node test-static release static clean

test: test-rust test-node test-static

# Real servers the integration tests run as workers, from
# tests/requirements.txt into a venv under target/ (gunicorn: its own
# sd_listen_fds and sd_notify).
PY_VENV := target/py
GUNICORN := $(CURDIR)/$(PY_VENV)/bin/gunicorn

$(PY_VENV)/bin/gunicorn: tests/requirements.txt
	python3 -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

# Builds the binary and the example worker first: the integration tests
# run both as real processes.
test-rust: $(PY_VENV)/bin/gunicorn
	cargo build --bins --examples
	CONTAINERFLIP_GUNICORN=$(GUNICORN) cargo test

# Installs the helper's devDependencies (frameworks, typescript) from the
# lock file, then runs node:test against the binary built above.
test-node: test-rust
	node clients/node/test/require-node.mjs
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error && npm test

release:
	cargo build --release

# A fully static binary (glibc linked in, non-PIE: no interpreter and no
# dynamic section). Where the musl target is installed,
# --target x86_64-unknown-linux-musl works as well.
static:
	RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" cargo build --release --target $(STATIC_TARGET)
	@echo "$(STATIC_BIN)"

# The static binary must really be static (no program interpreter, no
# dynamic section) and pass the same integration tests as the dynamic one.
test-static: static $(PY_VENV)/bin/gunicorn
	@if readelf -lW $(STATIC_BIN) | grep -q INTERP; then echo "$(STATIC_BIN) has a program interpreter"; exit 1; fi
	@readelf -d $(STATIC_BIN) | grep -q "no dynamic section" || { echo "$(STATIC_BIN) has a dynamic section"; exit 1; }
	@file $(STATIC_BIN) | grep -q "statically linked" || { file $(STATIC_BIN); echo "file(1) does not call it statically linked"; exit 1; }
	$(STATIC_BIN) --version
	CONTAINERFLIP_BIN=$(CURDIR)/$(STATIC_BIN) CONTAINERFLIP_GUNICORN=$(GUNICORN) cargo test --test integration

clean:
	cargo clean
	rm -rf clients/node/node_modules
