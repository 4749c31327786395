# veil — the two commands a newcomer needs:
#   make demo   build veil and run the whole platform once on embedded defaults
#   make test   install missing test dependencies and run the whole test suite
# Both need root: sandboxes are Linux namespaces and cgroups.

CARGO ?= cargo

.PHONY: demo test deps build lint fuzz

demo:
	./scripts/install-deps.sh build
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

# Bounded fuzzing of every parser of untrusted input (cargo-fuzz needs nightly features;
# RUSTC_BOOTSTRAP lets the stable toolchain provide them).
FUZZ_SECONDS ?= 30
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	@for t in kbs_request manifest_parse layer_unpack enc_annotations signature_policy admin_request; do \
	  echo "fuzzing $$t for $(FUZZ_SECONDS)s"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done
