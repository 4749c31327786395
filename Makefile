# veil — the two commands a newcomer needs:
#   make demo   build veil and run the whole platform once on embedded defaults
#   make test   install missing test dependencies and run the whole test suite
# Both need root: sandboxes are Linux namespaces and cgroups.

CARGO ?= cargo

.PHONY: demo test deps build lint bench

demo:
	$(CARGO) build --release --bins
	./target/release/veil demo

deps:
	./scripts/install-deps.sh

# The end-to-end tests start the real veil-agent binary, so binaries are built first.
build:
	$(CARGO) build --workspace --bins

test: deps build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
