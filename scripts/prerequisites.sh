#!/usr/bin/env bash
# scripts/prerequisites.sh — checks (and installs) the tools the Makefile needs.
#
#   scripts/prerequisites.sh            everything `make test` needs
#   scripts/prerequisites.sh NAME...    only these checks (the Makefile's targets ask for
#                                       what they use; `wrk` is only checked when named)
#
# Checks: make curl cc wasm-target rustfmt clippy python-venv node promtool redis-server
# openssl rocksdb wrk. All checks run first and everything missing is collected; then
#   - the Rust pieces are added with rustup (per user, no root needed);
#   - the system packages go in one apt-get transaction when run as root on Debian/Ubuntu
#     (apt-get update once, --no-install-recommends, and a temporary
#     /usr/sbin/policy-rc.d that forbids starting services, so the prometheus and
#     redis-server packages bring their binaries but start no daemon);
#   - otherwise one command that installs everything missing is printed, exit status 1.
# Prints nothing and runs no apt-get when everything is there.
#
# Environment (the Makefile passes its variables of the same names): PYTHON (python3),
# NODE (node), PROMTOOL (promtool), REDIS_SERVER (redis-server). A value other than the
# default name is a path the user chose: when it is missing it is reported, not installed.
set -euo pipefail

PYTHON=${PYTHON:-python3}
NODE=${NODE:-node}
PROMTOOL=${PROMTOOL:-promtool}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
WASM_TARGET=wasm32-wasip1
ALL_CHECKS=(make curl cc wasm-target rustfmt clippy python-venv node promtool redis-server openssl rocksdb)

say() { echo "prerequisites: $*" >&2; }

checks=("$@")
if ((${#checks[@]} == 0)); then
  checks=("${ALL_CHECKS[@]}")
fi

have() { command -v "$1" >/dev/null 2>&1; }

# Debian's python3 splits venv's ensurepip into python3.X-venv; importing both is the
# fast form of "python3 -m venv works" (creating a venv takes seconds).
python_venv_ok() { "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; }

rustup_installed() { rustup "$1" list --installed 2>/dev/null; }

packages=()     # apt packages to install
rust_cmds=()    # rustup commands to run
missing=()      # what is missing, for the messages
unfixable=()    # missing and no package for it (a user-chosen path, no rustup)

# $1 variable name, $2 its value, $3 its default, $4... the apt packages providing it.
need_tool() {
  local var=$1 value=$2 default=$3
  shift 3
  have "$value" && return 0
  if [[ "$value" == "$default" ]]; then
    missing+=("$default")
    packages+=("$@")
  else
    unfixable+=("$var=$value (not found; unset $var to have $default installed)")
  fi
}

check() {
  case $1 in
    make | curl) have "$1" || { missing+=("$1"); packages+=("$1"); } ;;
    # The C toolchain cargo links native binaries (tests, build scripts) with.
    cc) have cc || { missing+=(cc); packages+=(gcc libc6-dev); } ;;
    wasm-target)
      if ! have rustup; then
        unfixable+=("rustup (install Rust with rustup: https://rustup.rs)")
      elif ! rustup_installed target | grep -qx "$WASM_TARGET"; then
        missing+=("rust target $WASM_TARGET")
        rust_cmds+=("rustup target add $WASM_TARGET")
      fi
      ;;
    rustfmt | clippy)
      if ! have rustup; then
        unfixable+=("rustup (install Rust with rustup: https://rustup.rs)")
      elif ! rustup_installed component | grep -q "^$1"; then
        missing+=("rust component $1")
        rust_cmds+=("rustup component add $1")
      fi
      ;;
    # `make envoy` creates .venv with `$PYTHON -m venv` (Envoy comes from PyPI).
    python-venv)
      if ! have "$PYTHON"; then
        need_tool PYTHON "$PYTHON" python3 python3 python3-venv
      elif ! python_venv_ok; then
        if [[ "$PYTHON" == python3 ]]; then
          missing+=("python3 venv")
          packages+=(python3-venv "$("$PYTHON" -c 'import sys; print(f"python3.{sys.version_info.minor}-venv")')")
        else
          unfixable+=("PYTHON=$PYTHON cannot create a venv (import venv, ensurepip failed)")
        fi
      fi
      ;;
    # scripts/wasi-run.mjs needs node:wasi with WASI preview1 (Node 18.17 and later;
    # Debian 12's nodejs 18.20 does).
    node)
      if ! have "$NODE"; then
        need_tool NODE "$NODE" node nodejs
      elif ! "$NODE" --no-warnings -e 'new (require("node:wasi").WASI)({ version: "preview1" })' \
        >/dev/null 2>&1; then
        unfixable+=("NODE=$NODE is Node $("$NODE" --version 2>/dev/null), without WASI preview1 \
(scripts/wasi-run.mjs needs Node.js 18.17 or later)")
      fi
      ;;
    # Debian's prometheus package ships promtool (and the server, kept stopped).
    promtool) need_tool PROMTOOL "$PROMTOOL" promtool prometheus ;;
    redis-server) need_tool REDIS_SERVER "$REDIS_SERVER" redis-server redis-server ;;
    # tools/rls-engine links OpenSSL (limitador's Redis client, native-tls): openssl-sys
    # needs pkg-config and the headers.
    openssl)
      if ! { have pkg-config && pkg-config --exists openssl; }; then
        missing+=("pkg-config + OpenSSL headers")
        packages+=(pkg-config libssl-dev)
      fi
      ;;
    # tools/rls-engine depends on the published limitador crate with its default
    # features (its Redis storage needs the disk storage's key code): librocksdb-sys links
    # the system's RocksDB and Snappy (the Makefile sets ROCKSDB_LIB_DIR/SNAPPY_LIB_DIR
    # from their pkg-config files) and runs bindgen, which loads libclang.
    rocksdb)
      if ! { have pkg-config && pkg-config --exists rocksdb snappy; }; then
        missing+=("RocksDB + Snappy libraries")
        packages+=(pkg-config librocksdb-dev libsnappy-dev)
      fi
      if ! compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null &&
        ! compgen -G '/usr/lib/*/libclang.so' >/dev/null; then
        missing+=("libclang (bindgen)")
        packages+=(libclang-dev)
      fi
      ;;
    wrk) have wrk || { missing+=(wrk); packages+=(wrk); } ;;
    *)
      say "unknown check '$1' (known: ${ALL_CHECKS[*]} wrk)"
      exit 2
      ;;
  esac
}

for c in "${checks[@]}"; do
  check "$c"
done
if ((${#missing[@]} + ${#unfixable[@]} == 0)); then
  exit 0
fi

# Deduplicated, order kept.
dedup() { printf '%s\n' "$@" | awk 'NF && !seen[$0]++'; }
mapfile -t packages < <(dedup "${packages[@]}")
mapfile -t rust_cmds < <(dedup "${rust_cmds[@]}")
mapfile -t unfixable < <(dedup "${unfixable[@]}")
if ((${#missing[@]})); then
  mapfile -t missing < <(dedup "${missing[@]}")
  say "missing: $(IFS=,; echo "${missing[*]}" | sed 's/,/, /g')"
fi

failed_rust=()
for cmd in "${rust_cmds[@]}"; do
  say "$cmd"
  $cmd >&2 || failed_rust+=("$cmd")
done

apt_done=
if ((${#packages[@]})) && have apt-get && [[ $(id -u) == 0 ]]; then
  say "installing with apt-get (services are not started): ${packages[*]}"
  apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "$@" </dev/null
  }
  apt_get update -qq
  # python3.X-venv exists only for Debian's own python3 versions.
  installable=()
  for p in "${packages[@]}"; do
    if [[ "$p" != python3.*-venv ]] || apt-cache show "$p" >/dev/null 2>&1; then
      installable+=("$p")
    fi
  done
  # Postinst scripts start services through invoke-rc.d / deb-systemd-invoke, which ask
  # /usr/sbin/policy-rc.d first: exit 101 means "action forbidden". Removed afterwards
  # (one that was already there is left alone).
  guard=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    guard=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    trap 'exit 130' INT TERM
  fi
  status=0
  apt_get install -y -qq --no-install-recommends "${installable[@]}" >&2 || status=$?
  if [[ -n "$guard" ]]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT INT TERM
  fi
  if ((status != 0)); then
    say "apt-get install failed (status $status)"
    exit 1
  fi
  apt_done=1
fi

# Check again: what is still missing is reported with what installs it.
if [[ -n "$apt_done" || ${#rust_cmds[@]} -gt 0 ]]; then
  missing=() packages=() rust_cmds=() unfixable=()
  for c in "${checks[@]}"; do
    check "$c"
  done
  if ((${#missing[@]} + ${#unfixable[@]} == 0)); then
    say "all present now"
    exit 0
  fi
  mapfile -t packages < <(dedup "${packages[@]}")
  mapfile -t rust_cmds < <(dedup "${rust_cmds[@]}")
  mapfile -t unfixable < <(dedup "${unfixable[@]}")
  if [[ -n "$apt_done" && ${#packages[@]} -gt 0 ]]; then
    say "still missing after apt-get install: ${packages[*]}"
  fi
fi

for u in "${unfixable[@]}"; do
  say "cannot install: $u"
done
cmds=()
if ((${#packages[@]})); then
  if have apt-get; then
    sudo=
    [[ $(id -u) == 0 ]] || sudo="sudo "
    cmds+=("${sudo}apt-get update && ${sudo}apt-get install -y --no-install-recommends ${packages[*]}")
  else
    say "no apt-get here: install the equivalents of these Debian packages: ${packages[*]}"
  fi
fi
cmds+=("${rust_cmds[@]}")
if ((${#cmds[@]})); then
  line=${cmds[0]}
  for c in "${cmds[@]:1}"; do
    line+=" && $c"
  done
  say "install everything missing with:"
  echo "  $line" >&2
  if [[ " ${packages[*]} " == *" prometheus "* || " ${packages[*]} " == *" redis-server "* ]]; then
    say "(only the binaries are needed: where apt starts these packages' services," \
      "\`systemctl disable --now prometheus redis-server\` stops them)"
  fi
fi
exit 1
