#!/usr/bin/env bash
# The wheel check (`make wheel-check`, .ci/run): build the wheel, install it into fresh venvs and import
# every module of the source tree from there, so a module the wheel lacks fails by name.
#
#   [server]  every module under idl, ext, server, client and the root's, then `ringlm --help`
#   [client]  every module under client, `ringlm --help`, and torch, gguf and matplotlib not installed
#
# Fast on purpose: the wheel is built with the development venv's Cython and numpy (no isolated build),
# and setuptools reuses build/ when the extensions have not changed; torch (750 MB, pinned by the
# Makefile) is not installed again but hard-linked from the development venv: on this machine's disk,
# unpacking it and deleting it again take a minute and a half. Nothing is byte-compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=$root/.venv/bin/python   # the development venv (make install): Cython, numpy, torch
started=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The wheel takes all of build/lib, so a module deleted or left out since the last build would ship from
# there: keep only the compiled extensions, which setuptools rebuilds when their sources change.
[[ ! -d build ]] || find build -path 'build/lib.*' -type f ! -name '*.so' -delete
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/dist" .
wheel=$(echo "$work"/dist/ringlm-*.whl)
echo "built $(basename "$wheel") in $((SECONDS - started)) s"

new_venv() { "$python" -m venv --without-pip "$work/$1"; }
install() { local venv=$1; shift; "$python" -m pip --python "$work/$venv/bin/python" install --quiet --no-compile "$@"; }
# Import the modules and run the command from an empty folder in isolated mode: no source on sys.path.
check() { local venv=$1; shift; (cd "$work" && "$work/$venv/bin/python" -I "$root/scripts/import_modules.py" "$root" "$@" \
                                   && "$work/$venv/bin/ringlm" --help >/dev/null); }

# The development venv's torch, dist-info included, so pip counts it as installed yet still checks it
# against ringlm[server] and installs its dependencies. Hard links need one file system: elsewhere,
# the same version from its wheel (the local file the Makefile installed).
add_torch() {
    local from to
    from=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    to=$("$work/$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [[ $(stat -c %d "$from") == $(stat -c %d "$to") ]]; then
        cp -al "$from"/{torch,torchgen,functorch,torch-*.dist-info} "$to/"
    else
        install "$1" "torch==$("$python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
    fi
}

step=$SECONDS
new_venv server
add_torch server
install server "ringlm[server] @ file://$wheel"
check server
echo "ringlm[server]: checked in $((SECONDS - step)) s"

step=$SECONDS
new_venv client
install client "ringlm[client] @ file://$wheel"
check client client --absent torch gguf matplotlib
echo "ringlm[client]: checked in $((SECONDS - step)) s"
echo "wheel check passed in $((SECONDS - started)) s"
