#!/usr/bin/env bash
# Compiles the datapath into endpoint.o (committed beside the source, so that a
# plain `cargo build` needs no clang). Deterministic: paths inside the object
# are relative and DWARF is stripped (BTF, which the loader needs, stays), so
# the same clang gives the same bytes in any checkout.
#   build.sh            rebuild endpoint.o
#   build.sh --check    fail if the committed endpoint.o is stale
set -euo pipefail
cd "$(dirname "$0")"
CLANG=${CLANG:-clang}
STRIP=${LLVM_STRIP:-llvm-strip}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$CLANG" -O2 -g -target bpf -Wall -Werror \
  -I/usr/include/"$(uname -m)"-linux-gnu \
  -fdebug-prefix-map="$PWD"=. -fdebug-compilation-dir=. \
  -c endpoint.c -o "$out/endpoint.o"
"$STRIP" -g "$out/endpoint.o"
if [ "${1:-}" = "--check" ]; then
  if ! cmp -s "$out/endpoint.o" endpoint.o; then
    echo "auth-ebpf/bpf/endpoint.o is stale: run auth-ebpf/bpf/build.sh and commit the object" >&2
    exit 1
  fi
  echo "auth-ebpf/bpf/endpoint.o is current ($("$CLANG" --version | head -1))"
else
  cp "$out/endpoint.o" endpoint.o
fi
