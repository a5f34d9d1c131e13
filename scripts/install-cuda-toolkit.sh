#!/usr/bin/env bash
# Installs nvcc idempotently on Debian/Ubuntu so that `make` can build the CUDA
# static library. On Debian bookworm the toolkit is CUDA 11.8 from the
# `non-free` component, whose nvcc needs g++-11 as host compiler (g++-12 is
# newer than CUDA 11.8 accepts). The binary links cudart statically, so the
# target machine needs only the NVIDIA driver.
set -euo pipefail

if command -v nvcc >/dev/null 2>&1 && command -v g++-11 >/dev/null 2>&1; then
  echo "install-cuda-toolkit: nvcc already present: $(nvcc --version | tail -n 1)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

. /etc/os-release
case "${ID:-}" in
debian)
  # Same mirror as the machine's own sources; add the non-free components.
  # The machine's own Debian mirror: a `URIs:` line of a deb822 .sources file
  # or the URL of a one-line `deb` entry (comments skipped).
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -oE '(URIs:[[:space:]]*|^deb[[:space:]]+)https?://[^ ]+' |
    grep -oE 'https?://[^ ]+' | grep -v -e security -e kvalign | head -n 1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  codename=${VERSION_CODENAME:-bookworm}
  # deb822 form with the same keyring as Debian's own entry: apt refuses two
  # entries for one mirror and suite whose Signed-By differ.
  list=/etc/apt/sources.list.d/kvalign-nonfree.sources
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  if [ ! -f "$list" ]; then
    {
      echo "Types: deb"
      echo "URIs: ${mirror%/}"
      echo "Suites: ${codename}"
      echo "Components: main contrib non-free non-free-firmware"
      if [ -f "$keyring" ]; then echo "Signed-By: $keyring"; fi
    } | $SUDO tee "$list" >/dev/null
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit g++-11 >/dev/null
  ;;
ubuntu)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit g++-11 >/dev/null
  ;;
*)
  echo "install-cuda-toolkit: unsupported distribution '${ID:-unknown}'; install the CUDA toolkit by hand" >&2
  exit 1
  ;;
esac
echo "install-cuda-toolkit: $(nvcc --version | tail -n 1)"
