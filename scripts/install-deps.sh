#!/usr/bin/env bash
# Install the system packages veil's tests use, if they are missing:
#   docker-registry  the CNCF distribution server, as a real OCI registry on loopback
#   skopeo           copies, encrypts and decrypts images (an image tool no one here wrote)
#   openssl          generates RSA key pairs for the encryption interop tests
#   libssl-dev, pkg-config  the system OpenSSL that the sigstore crate's crypto backend links
# The Rust toolchain (with cargo-nextest) is expected to be present already.
# With the argument `build`, only what building veil needs (for `make demo`).
set -euo pipefail
need=()
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
if [ "${1:-}" != build ]; then
  command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
  command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The registry package starts a system service on :5000 on some hosts; tests start their own.
exit 0
