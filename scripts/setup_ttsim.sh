#!/usr/bin/env bash
# Builds Tenstorrent's Wormhole simulator (ttsim) for the ttnn backend: one chip (release_wh, an n150) and two
# chips joined by Ethernet (release_wh_x2, an n300), each in a directory of its own beside the SOC descriptor
# tt-metal reads there.
#
#   scripts/setup_ttsim.sh [DIR [SOURCE]]       (default DIR: .ttsim)
#     DIR/wh/libttsim.so     + DIR/wh/soc_descriptor.yaml       one chip    (--target-device tt:0)
#     DIR/wh_x2/libttsim.so  + DIR/wh_x2/soc_descriptor.yaml    two chips   (--target-device tt:0/1x2)
#
# SOURCE (or TTSIM_SRC=) is a ttsim source tarball or unpacked tree; default ../shared/ttsim/ttsim-*-src.tar.gz
# beside this checkout. PYTHON= names the Python that has ttnn (for its SOC descriptor); default .venv-ttnn/bin/python.
# A simulator already built in DIR is kept; delete its directory to rebuild it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
DIR=${1:-.ttsim}
SOURCE=${2:-${TTSIM_SRC:-}}
PYTHON=${PYTHON:-$repo/.venv-ttnn/bin/python}
JOBS=${TTSIM_JOBS:-2}
say() { echo "setup_ttsim: $*" >&2; }
fail() { say "$*"; exit 1; }

if [ -z "$SOURCE" ]; then
    SOURCE=$(ls "$(dirname "$repo")"/shared/ttsim/ttsim-*-src.tar.gz 2>/dev/null | sort | tail -n 1) \
        || fail "no ttsim source in $(dirname "$repo")/shared/ttsim/; give a tarball or tree as the second argument or TTSIM_SRC="
fi
[ -e "$SOURCE" ] || fail "ttsim source $SOURCE does not exist; give a tarball or tree as the second argument or TTSIM_SRC="
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 \
    || fail "no Python at $PYTHON to find ttnn's SOC descriptor; run scripts/setup_ttnn_env.sh or set PYTHON="
soc=$("$PYTHON" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("ttnn"); print(pathlib.Path(s.origin).parent / "tt_metal/soc_descriptors/wormhole_b0_80_arch.yaml")' 2>/dev/null) \
    || fail "$PYTHON has no ttnn (the SOC descriptor comes from it); run scripts/setup_ttnn_env.sh or set PYTHON="
[ -f "$soc" ] || fail "the installed ttnn has no Wormhole SOC descriptor at $soc"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
declare -A layout=([wh]=release_wh [wh_x2]=release_wh_x2)
wanted=()
for name in wh wh_x2; do
    [ -f "$DIR/$name/libttsim.so" ] || wanted+=("$name")
done

if [ ${#wanted[@]} -gt 0 ]; then
    began=$SECONDS
    build=$(mktemp -d "$DIR/.build.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    if [ -d "$SOURCE" ]; then
        cp -r "$SOURCE" "$build/ttsim"
    else
        tar -xzf "$SOURCE" -C "$build"
    fi
    tree=$(dirname "$(find "$build" -maxdepth 2 -name make.py | head -n 1)")
    [ "$tree" != . ] || fail "$SOURCE holds no ttsim tree (no make.py)"
    targets=()
    for name in "${wanted[@]}"; do targets+=("src/_out/${layout[$name]}/libttsim.so"); done
    (cd "$tree" && python3 make.py -j "$JOBS" "${targets[@]}" >"$build/make.log" 2>&1) \
        || { tail -n 20 "$build/make.log" >&2; fail "building ttsim from $SOURCE failed (log above)"; }
    for name in "${wanted[@]}"; do
        mkdir -p "$DIR/$name"
        # copy to a temporary name first: a half-copied library must not look like a finished build
        cp "$tree/src/_out/${layout[$name]}/libttsim.so" "$DIR/$name/.libttsim.so.part"
        mv "$DIR/$name/.libttsim.so.part" "$DIR/$name/libttsim.so"
    done
    say "built ${wanted[*]} from $SOURCE in $((SECONDS - began)) s"
else
    say "wh and wh_x2 already built in $DIR"
fi
for name in wh wh_x2; do
    cp "$soc" "$DIR/$name/soc_descriptor.yaml"
done

cat <<EOF
# one simulated Wormhole chip (an n150): --target-device tt:0
export TT_METAL_SIMULATOR=$DIR/wh/libttsim.so TT_METAL_SLOW_DISPATCH_MODE=1
# two chips (an n300): --target-device tt:0/1x2
export TT_METAL_SIMULATOR=$DIR/wh_x2/libttsim.so TT_METAL_SLOW_DISPATCH_MODE=1
EOF
