#!/usr/bin/env bash
# Compiles the datapath into endpoint.o, and the test fixtures under test/ (committed beside the source, so that a
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
compile() { # source, object
  "$CLANG" -O2 -g -target bpf -Wall -Werror \
    -I/usr/include/"$(uname -m)"-linux-gnu \
    -fdebug-prefix-map="$PWD"=. -fdebug-compilation-dir=. \
    -c "$1" -o "$out/$2"
  "$STRIP" -g "$out/$2"
}
OBJECTS=(endpoint.o test/redirect_peer.o test/baseline.o)
mkdir -p "$out/test"
compile endpoint.c endpoint.o
compile test/redirect_peer.c test/redirect_peer.o
compile test/baseline.c test/baseline.o
if [ "${1:-}" = "--check" ]; then
  for o in "${OBJECTS[@]}"; do
    if ! cmp -s "$out/$o" "$o"; then
      echo "auth-ebpf/bpf/$o is stale: run auth-ebpf/bpf/build.sh and commit the object" >&2
      exit 1
    fi
  done
  echo "auth-ebpf/bpf objects are current (${OBJECTS[*]}; $("$CLANG" --version | head -1))"
else
  for o in "${OBJECTS[@]}"; do cp "$out/$o" "$o"; done
fi
