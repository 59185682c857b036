#!/usr/bin/env bash
# Installs libmirror's C library, header and pkg-config file under a prefix:
#
#   PREFIX=/usr/local bash ci/install.sh        # default PREFIX is /usr/local
#   DESTDIR=/tmp/stage PREFIX=/usr bash ci/install.sh   # staged (packaging)
#   LIBDIR=/usr/lib/x86_64-linux-gnu PREFIX=/usr ...     # a distribution's library directory
#
# puts
#   $PREFIX/lib/libmirror.so.<version>   the shared library (SONAME libmirror.so.0)
#   $PREFIX/lib/libmirror.so.0           -> libmirror.so.<version>   (what programs load)
#   $PREFIX/lib/libmirror.so             -> libmirror.so.0            (what the linker finds)
#   $PREFIX/lib/libmirror.a              the static library
#   $PREFIX/include/mirror.h             the header
#   $PREFIX/lib/pkgconfig/mirror.pc      for  cc app.c $(pkg-config --cflags --libs mirror)
#
# It builds the library first (cargo build --release --lib; a no-op when it is up to date).
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

cargo build --release --lib
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
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@LIBDIR@|$LIBDIR|g" -e "s|@VERSION@|$version|g" mirror.pc.in \
  >"$libdest/pkgconfig/mirror.pc"
chmod 0644 "$libdest/pkgconfig/mirror.pc"

# Refresh the loader cache when installing for real into a directory it searches.
if [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ] && command -v ldconfig >/dev/null 2>&1; then
  case "$PREFIX" in
    /usr | /usr/local) ldconfig ;;
  esac
fi
echo "ci/install.sh: installed libmirror $version (SONAME libmirror.so.$major) under $dest"
