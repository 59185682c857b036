#!/usr/bin/env bash
# Installs libmirror's C library, header and pkg-config file under a prefix:
#
#   PREFIX=/usr/local bash ci/install.sh        # default PREFIX is /usr/local
#   DESTDIR=/tmp/stage PREFIX=/usr bash ci/install.sh   # staged (packaging)
#   LIBDIR=/usr/lib/x86_64-linux-gnu PREFIX=/usr ...     # a distribution's library directory
#   FEATURES=rdma PREFIX=/usr/local bash ci/install.sh  # with the RDMA verbs transport
#
# FEATURES is the build's feature set: empty (the default build: TCP, links only libc and
# libgcc_s) or `rdma` (`transport = rdma`; links libibverbs, and its Debian build packages are
# installed when missing). Anything else is refused (exit 2): `fail-points` is for tests only.
# A featured build has its own target directory, target/<features> (target/rdma, the one
# ci/softroce-test.sh uses), so switching does not rebuild the default one; a CARGO_TARGET_DIR
# already set wins. docs/FFI.md says what each build links, shared and static.
#
# puts
#   $PREFIX/lib/libmirror.so.<version>   the shared library (SONAME libmirror.so.0)
#   $PREFIX/lib/libmirror.so.0           -> libmirror.so.<version>   (what programs load)
#   $PREFIX/lib/libmirror.so             -> libmirror.so.0            (what the linker finds)
#   $PREFIX/lib/libmirror.a              the static library
#   $PREFIX/include/mirror.h             the header
#   $PREFIX/lib/pkgconfig/mirror.pc      for  cc app.c $(pkg-config --cflags --libs mirror)
#
# It builds the library first (cargo build --release --lib [--features ...]; a no-op when it is up
# to date).
# Outside the linker's default paths, point pkg-config and the loader at the prefix:
#   PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig  and  LD_LIBRARY_PATH=$PREFIX/lib (or -Wl,-rpath).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
LIBDIR=${LIBDIR:-$PREFIX/lib}
for dir in "$PREFIX" "$LIBDIR"; do
  case "$dir" in
    /*) ;;
    *) echo "ci/install.sh: PREFIX and LIBDIR must be absolute paths (got '$dir')" >&2; exit 2 ;;
  esac
done
# Commas or spaces between features; the list is normalised to "a,b".
features=$(echo "${FEATURES:-}" | tr ', ' '\n\n' | sed '/^$/d' | sort -u | paste -sd, -)
for feature in ${features//,/ }; do
  case "$feature" in
    rdma) ;;
    *) echo "ci/install.sh: unknown feature '$feature' in FEATURES (an installed build has: rdma)" >&2; exit 2 ;;
  esac
done

features_arg=()
if [ -n "$features" ]; then
  features_arg=(--features "$features")
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/${features//,/-}}
fi
if [[ ",$features," == *,rdma,* ]]; then
  # rdma-sys's build script finds libibverbs and librdmacm with pkg-config and runs bindgen
  # (libclang) on their headers.
  apt_install_missing libibverbs-dev librdmacm-dev pkg-config libclang1-14 libclang-common-14-dev
fi

# The build's messages (JSON on stdout; diagnostics still rendered on stderr) name the system
# libraries each build script links: rdma-sys's are libibverbs and librdmacm. A static link of
# libmirror.a needs them, except `static=` ones, which rustc bundles into the archive (ring's C
# code). With the standard library's list in mirror.pc.in this is what
# `cargo rustc --lib -- --print native-static-libs` prints, without a second build to print it.
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
cargo build --release --lib "${features_arg[@]}" --message-format=json-render-diagnostics >"$build_log"
native_libs=""
for l in $(grep '"reason":"build-script-executed"' "$build_log" |
  sed -n 's/.*"linked_libs":\[\([^]]*\)\].*/\1/p' | sed 's/","/\n/g' | tr -d '"'); do
  case "$l" in
    static=* | static:*) [[ "$l" == *-bundle* ]] || continue ;;
  esac
  case " $native_libs " in
    *" -l${l#*=} "*) ;;
    *) native_libs="$native_libs -l${l#*=}" ;;
  esac
done
native_libs=${native_libs# }
# cargo metadata follows CARGO_TARGET_DIR (ours, or the caller's) and .cargo/config.toml.
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
lib=${target_dir:-target}/release
pkgid=$(cargo pkgid -p mirror)
version=${pkgid##*[#@]}
major=${version%%.*}

dest=$DESTDIR$PREFIX
libdest=$DESTDIR$LIBDIR
install -d "$libdest/pkgconfig" "$dest/include"
install -m 0755 "$lib/libmirror.so" "$libdest/libmirror.so.$version"
ln -sfn "libmirror.so.$version" "$libdest/libmirror.so.$major"
ln -sfn "libmirror.so.$major" "$libdest/libmirror.so"
install -m 0644 "$lib/libmirror.a" "$libdest/libmirror.a"
install -m 0644 include/mirror.h "$dest/include/mirror.h"
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@LIBDIR@|$LIBDIR|g" -e "s|@VERSION@|$version|g" \
  -e "s|@FEATURES@|$features|g" -e "s|@NATIVE_LIBS@ |${native_libs:+$native_libs }|g" mirror.pc.in \
  >"$libdest/pkgconfig/mirror.pc"
chmod 0644 "$libdest/pkgconfig/mirror.pc"

# Refresh the loader cache when installing for real into a directory it searches.
if [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ] && command -v ldconfig >/dev/null 2>&1; then
  case "$PREFIX" in
    /usr | /usr/local) ldconfig ;;
  esac
fi
echo "ci/install.sh: installed libmirror $version (SONAME libmirror.so.$major; features: ${features:-none}) under $dest"
