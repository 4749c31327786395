#!/usr/bin/env bash
# Install the system packages veil's tests use, if they are missing:
#   docker-registry  the CNCF distribution server, as a real OCI registry on loopback
#   skopeo           copies, encrypts and decrypts images (an image tool no one here wrote)
#   umoci, runc      unpack and run an OCI image: the pipeline a user would script instead
#                    of veil, which `veil bench` (and its test) times beside veil
#   openssl          generates RSA key pairs for the encryption interop tests
#   libssl-dev, pkg-config  the system OpenSSL that the sigstore crate's crypto backend links
#   cosign           the reference cosign/sigstore signing tool, for signature interop tests.
#                    Bookworm has no cosign, and its skopeo is built with sigstore disabled
#                    ("Debian-local change: sigstore disabled"), so the binary is taken from
#                    Debian trixie's cosign package (a static Go binary; only libc) into
#                    /usr/local/bin without installing the package or touching apt's sources.
#   qemu-system-x86  boots the microVM guests (under TCG where KVM does not run them)
#   guest kernel     Debian's cloud kernel (the image package that linux-image-cloud-amd64
#                    depends on), downloaded with apt-get and unpacked with dpkg-deb into
#                    /var/cache/veil/guest-kernel (boot/vmlinuz-*, boot/config-*,
#                    lib/modules/*), where `veil guest build` finds it. Nothing is installed
#                    into this machine's /boot and no package is registered with dpkg.
#   cvm guest kernel Debian trixie's cloud kernel (6.12), unpacked the same way into
#                    /var/cache/veil/guest-kernel-cvm: the kernel of confidential guests,
#                    whose modules include the SEV-SNP and TDX guest drivers and configfs-tsm
#                    (bookworm's 6.1 cloud kernel has none of them). From the machine's own
#                    Debian archive with trixie as the suite, like cosign.
#   ovmf             Debian's OVMF firmware (/usr/share/OVMF), which the SNP launch measurement
#                    tests measure
#   sev-snp-measure  the reference SEV-SNP launch measurement tool (PyPI, pinned version) that
#                    those tests compare against, in a venv at /usr/local/lib/sev-snp-measure
#                    linked as /usr/local/bin/sev-snp-measure (python3-venv provides the venv)
# The Rust toolchain (with cargo-nextest) is expected to be present already.
# With the argument `build`, only what building veil needs (for `make demo`).
set -euo pipefail

# Print the URI of the apt source that serves this release's `main` component, read from the
# machine's apt configuration (one-line .list files and deb822 .sources files).
debian_mirror() {
  python3 - <<'PY'
import glob, re
codename = ""
for line in open("/etc/os-release"):
    if line.startswith("VERSION_CODENAME="):
        codename = line.split("=", 1)[1].strip().strip('"')
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
for f in files:
    try:
        lines = open(f).read().splitlines()
    except OSError:
        continue
    for l in lines:
        l = re.sub(r"\[[^]]*\]", " ", l.split("#", 1)[0]).split()
        if len(l) >= 4 and l[0] == "deb" and l[2] == codename and "main" in l[3:]:
            print(l[1]); raise SystemExit
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(f).read()
    except OSError:
        continue
    for para in re.split(r"\n\s*\n", text):
        fields = {}
        for l in para.splitlines():
            if l.startswith("#") or ":" not in l:
                continue
            k, v = l.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if (codename in fields.get("suites", []) and "main" in fields.get("components", [])
                and "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]):
            print(fields["uris"][0]); raise SystemExit
PY
}

# A throw-away apt state in directory $1 whose only source is this machine's Debian archive with
# trixie as the suite (no archive host name is written into this script); its apt options go
# into the array trixie_apt_opts.
trixie_apt() {
  local dir=$1 mirror
  mirror=$(debian_mirror)
  if [ -z "$mirror" ]; then
    echo "cannot find this machine's Debian archive in /etc/apt/sources.list{,.d/}" >&2
    exit 1
  fi
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  echo "deb $mirror trixie main" >"$dir/sources.list"
  trixie_apt_opts=(-o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                   -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache"
                   -o APT::Sandbox::User=root)
  apt-get "${trixie_apt_opts[@]}" update -qq
}

# The kernel image package the cloud kernel's metapackage depends on right now (for example
# linux-image-6.1.0-NN-cloud-amd64); arguments are extra apt options.
kernel_pkg() {
  apt-cache "$@" depends linux-image-cloud-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

# Unpack the kernel package $2, downloaded into directory $1, into $3 (swapped into place; never
# installed into this machine's /boot, nor registered with dpkg).
unpack_kernel() {
  local from=$1 pkg=$2 dir=$3
  dpkg-deb -x "$from/${pkg}"_*.deb "$from/x"
  rm -rf "$from/x/usr/share"
  mkdir -p "$(dirname "$dir")"
  rm -rf "$dir.old"
  [ ! -e "$dir" ] || mv "$dir" "$dir.old"
  mv "$from/x" "$dir"
  rm -rf "$dir.old"
  test -f "$dir/boot/vmlinuz-${pkg#linux-image-}"
}

need=()
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
if [ "${1:-}" != build ]; then
  command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
  command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
  command -v umoci >/dev/null 2>&1 || need+=(umoci)
  command -v runc >/dev/null 2>&1 || need+=(runc)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  [ -f /usr/share/OVMF/OVMF_CODE.fd ] || need+=(ovmf)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
  command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
  # trustee's KBS and kbs-client ship xz-compressed (crates/veil-testkit/testdata/trustee).
  command -v xz >/dev/null 2>&1 || need+=(xz-utils)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ "${1:-}" != build ] && ! command -v cosign >/dev/null 2>&1; then
  echo "installing: cosign (binary from Debian trixie's cosign package)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  trixie_apt "$tmp"
  (cd "$tmp" && apt-get "${trixie_apt_opts[@]}" download cosign)
  dpkg-deb -x "$tmp"/cosign_*.deb "$tmp/x"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO install -m 0755 "$tmp/x/usr/bin/cosign" /usr/local/bin/cosign
  cosign version >/dev/null
fi
if [ "${1:-}" != build ]; then
  # The guest kernel: this release's cloud kernel, unpacked unless that version already is.
  dir=/var/cache/veil/guest-kernel
  pkg=$(kernel_pkg)
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(kernel_pkg)
  fi
  if [ -z "$pkg" ]; then
    echo "cannot resolve linux-image-cloud-amd64 with this machine's apt sources" >&2
    exit 1
  fi
  version=${pkg#linux-image-}
  if [ ! -f "$dir/boot/vmlinuz-$version" ] || [ ! -d "$dir/lib/modules/$version" ]; then
    echo "installing: guest kernel $pkg into $dir (not into /boot)"
    ktmp=$(mktemp -d)
    (cd "$ktmp" && apt-get -o APT::Sandbox::User=root download -qq "$pkg")
    unpack_kernel "$ktmp" "$pkg" "$dir"
    rm -rf "$ktmp"
  fi
fi
sev_snp_measure=0.0.13
if [ "${1:-}" != build ] &&
   [ "$(sev-snp-measure --version 2>/dev/null)" != "sev-snp-measure $sev_snp_measure" ]; then
  echo "installing: sev-snp-measure $sev_snp_measure (PyPI) into /usr/local/lib/sev-snp-measure"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO python3 -m venv /usr/local/lib/sev-snp-measure
  $SUDO /usr/local/lib/sev-snp-measure/bin/pip install -q "sev-snp-measure==$sev_snp_measure"
  $SUDO ln -sf /usr/local/lib/sev-snp-measure/bin/sev-snp-measure /usr/local/bin/sev-snp-measure
  sev-snp-measure --version >/dev/null
fi
if [ "${1:-}" != build ]; then
  # The confidential guests' kernel: trixie's cloud kernel, from a throw-away apt state whose
  # only source is this machine's Debian archive with trixie as the suite.
  cdir=/var/cache/veil/guest-kernel-cvm
  ctmp=$(mktemp -d)
  trixie_apt "$ctmp"
  cpkg=$(kernel_pkg "${trixie_apt_opts[@]}")
  if [ -z "$cpkg" ]; then
    echo "cannot resolve trixie's linux-image-cloud-amd64 from this machine's Debian archive" >&2
    exit 1
  fi
  if [ ! -f "$cdir/boot/vmlinuz-${cpkg#linux-image-}" ]; then
    echo "installing: confidential guests' kernel $cpkg (trixie) into $cdir (not into /boot)"
    (cd "$ctmp" && apt-get "${trixie_apt_opts[@]}" download -qq "$cpkg")
    unpack_kernel "$ctmp" "$cpkg" "$cdir"
  fi
  rm -rf "$ctmp"
fi
# The registry package starts a system service on :5000 on some hosts; tests start their own.
exit 0
