#!/usr/bin/env bash
# Build OVMF's AmdSevX64 platform (the OVMF with the SNP kernel-hashes page that QEMU's
# `kernel-hashes=on` fills) from Debian's own edk2 source package, and write it,
# gzip-compressed, next to this script as OVMF.amdsev.fd.gz.
#
# The suite is trixie by default (SUITE=...): bookworm's edk2 (2022.11) predates the
# SNP_KERNEL_HASHES section of the SEV metadata (edk2 added it in 2023), so its AmdSevX64
# build boots SNP guests but cannot measure a directly booted kernel.
#
# Needs: dpkg-dev, build-essential, uuid-dev, nasm, acpica-tools, python3, and for the GRUB
# that AmdSevX64 embeds: grub-common, grub-efi-amd64-bin, dosfstools, mtools.
# The source comes from the Debian archive this machine's apt sources name (as deb-src, in a
# temporary apt configuration): no archive host is written here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-$(mktemp -d)}
echo "working in $work"
cd "$work"

codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
suite=${SUITE:-trixie}
python3 - "$codename" "$suite" >sources.list <<'PY'
import glob, re, sys
codename, suite = sys.argv[1], sys.argv[2]
for f in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(f).read().splitlines()
    except OSError:
        continue
    for l in lines:
        l = re.sub(r"\[[^]]*\]", " ", l.split("#", 1)[0]).split()
        if len(l) >= 4 and l[0] == "deb" and l[2] == codename and "main" in l[3:]:
            print("deb-src", l[1], suite, "main"); raise SystemExit
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for para in re.split(r"\n\s*\n", open(f).read()):
        fields = {}
        for l in para.splitlines():
            if l.startswith("#") or ":" not in l:
                continue
            k, v = l.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if (codename in fields.get("suites", []) and "main" in fields.get("components", [])
                and "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]):
            print("deb-src", fields["uris"][0], suite, "main"); raise SystemExit
sys.exit("no Debian archive for %s main in this machine's apt sources" % codename)
PY
mkdir -p lists/partial cache/archives/partial
apt_opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache"
          -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update -qq
# apt checks every file it fetches against the suite's signed Sources index. Some mirrors
# serve the tarballs but not the .dsc; then the two tarballs are unpacked and Debian's patch
# series applied by hand, which is what dpkg-source -x does.
apt-get "${apt_opts[@]}" source --download-only edk2 || true
if ls edk2_*.dsc >/dev/null 2>&1; then
  dpkg-source -x edk2_*.dsc src
else
  mkdir src
  tar xf edk2_*.orig.tar.xz -C src --strip-components=1
  tar xf edk2_*.debian.tar.xz -C src
  while read -r p; do
    case "$p" in ''|'#'*) continue ;; esac
    patch -d src -p1 --quiet <"src/debian/patches/$p"
  done <src/debian/patches/series
fi
ls edk2_*
sha256sum edk2_*
cd src

# Debian bookworm's GRUB (2.06) has no `sevsecret` module, which AmdSevX64's grub.sh asks
# for (it lets GRUB unlock a LUKS disk with an SEV-injected secret). veil boots the kernel
# directly (QEMU -kernel, verified by the hashes table), never through this GRUB, so it is
# built without that one module.
sed -i '/^ *sevsecret$/d' OvmfPkg/AmdSev/Grub/grub.sh
export PYTHON_COMMAND=/usr/bin/python3
set +u
. ./edksetup.sh
set -u
make -C BaseTools ARCH=X64 -j"$(nproc)"
build -a X64 -t GCC5 -b RELEASE -n "$(nproc)" -p OvmfPkg/AmdSev/AmdSevX64.dsc
fd=Build/AmdSev/RELEASE_GCC5/FV/OVMF.fd
ls -l "$fd"
sha256sum "$fd"
gzip -9 -n -c "$fd" >"$here/OVMF.amdsev.fd.gz"
echo "wrote $here/OVMF.amdsev.fd.gz"
