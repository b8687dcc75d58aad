#!/usr/bin/env bash
# Build vmm's guest kernel (Debian linux-source-6.1 + patches/ + config fragment) into a cache.
#
#   build.sh              build if needed; the last stdout line is the output directory
#   build.sh --print-key  print the cache key (line 1) and output directory (line 2); no build
#   build.sh --force      rebuild from a fresh source tree even if the output exists
#
# Output: $CACHE/kernel/<key>/{bzImage,vmlinux,System.map,config,version}
#   CACHE = ${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm}
#   key   = first 16 hex digits of sha256 over: "linux-source-6.1=<dpkg version>\n", then for
#           config, patches/*.patch (C-locale sorted) and build.sh: "<relative path>\n" + contents.
#           (vmm/images/kernel.py relies on build.sh --print-key for this.)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/vmm}"
KROOT="$CACHE/kernel"
TARBALL=/usr/src/linux-source-6.1.tar.xz
SRCPKG=linux-source-6.1
PACKAGES=(linux-source-6.1 bc flex bison libelf-dev libssl-dev lz4 make gcc xz-utils patch)
ARTIFACTS=(bzImage vmlinux System.map config version)

mode=build
for arg in "$@"; do
    case "$arg" in
        --print-key) mode=print-key ;;
        --force) mode=force ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf '[kernel] %s\n' "$*"; }
die() { printf '[kernel] error: %s\n' "$*" >&2; exit 1; }

pkg_version() { dpkg-query -W -f='${Version}' "$SRCPKG" 2>/dev/null || echo not-installed; }

patch_list() { (cd "$HERE" && LC_ALL=C ls -1 patches/*.patch 2>/dev/null | LC_ALL=C sort) || true; }

compute_key() {
    {
        printf '%s=%s\n' "$SRCPKG" "$(pkg_version)"
        local f
        for f in config $(patch_list) build.sh; do
            printf '%s\n' "$f"
            cat "$HERE/$f"
        done
    } | sha256sum | cut -c1-16
}

complete() {  # complete <dir>: all artifacts present and non-empty
    local a
    for a in "${ARTIFACTS[@]}"; do [[ -s "$1/$a" ]] || return 1; done
}

KEY="$(compute_key)"
OUT="$KROOT/$KEY"

if [[ $mode == print-key ]]; then
    printf '%s\n%s\n' "$KEY" "$OUT"
    exit 0
fi
if [[ $mode == build ]] && complete "$OUT"; then
    printf '%s\n' "$OUT"
    exit 0
fi

# ---------------------------------------------------------------- build dependencies
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        die "missing packages: ${missing[*]} (run build.sh as root, or: sudo apt-get install ${missing[*]})"
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >/dev/null \
        || die "apt-get install ${missing[*]} failed"
    KEY="$(compute_key)"   # the source package version is part of the key
    OUT="$KROOT/$KEY"
fi
[[ -r $TARBALL ]] || die "$TARBALL not found (package $SRCPKG)"

mkdir -p "$KROOT"
exec 9>"$KROOT/.lock"
flock 9                 # one kernel build at a time per cache
if [[ $mode == build ]] && complete "$OUT"; then   # somebody else built it while we waited
    printf '%s\n' "$OUT"
    exit 0
fi

start=$SECONDS
BUILD="$KROOT/build-$KEY"
SRC="$BUILD/linux"
BLOG="$BUILD/build.log"

# ---------------------------------------------------------------- source tree
# A tree is usable when .vmm-tree-ok exists; .vmm-patches/ records what was applied to it.
if [[ $mode == force ]]; then
    rm -rf "$BUILD"
fi
if [[ ! -e $SRC/.vmm-tree-ok ]]; then
    rm -rf "$BUILD"
    # Recycle the tree of another key (keeps its object files: incremental build) by reverting
    # its recorded patches; fall back to a fresh extraction if anything does not fit.
    old=""
    for d in "$KROOT"/build-*; do
        [[ -e $d/linux/.vmm-tree-ok && $d != "$BUILD" ]] && old="$d"
    done
    if [[ -n $old && $mode != force ]]; then
        log "reusing $(basename "$old") for an incremental build"
        mv "$old" "$BUILD"
        rm -f "$SRC/.vmm-tree-ok"
        ok=1
        while read -r p; do
            [[ -n $p ]] || continue
            (cd "$SRC" && patch -p1 -R -s --no-backup-if-mismatch < ".vmm-patches/$p") >>"$BLOG" 2>&1 || { ok=0; break; }
        done < <(cd "$SRC/.vmm-patches" 2>/dev/null && LC_ALL=C ls -1 | LC_ALL=C sort -r)
        if ((ok)); then rm -rf "$SRC/.vmm-patches"; else log "revert failed; extracting afresh"; rm -rf "$BUILD"; fi
    fi
    if [[ ! -d $SRC ]]; then
        log "extracting $TARBALL"
        mkdir -p "$BUILD"
        tar -xJf "$TARBALL" -C "$BUILD"
        mv "$BUILD/linux-source-6.1" "$SRC"
    fi
    mkdir -p "$SRC/.vmm-patches"
    for p in $(patch_list); do
        log "applying $(basename "$p")"
        (cd "$SRC" && patch -p1 -s --forward --no-backup-if-mismatch < "$HERE/$p") >>"$BLOG" 2>&1 \
            || die "patch $p does not apply (see $BLOG)"
        cp "$HERE/$p" "$SRC/.vmm-patches/"
    done
    touch "$SRC/.vmm-tree-ok"
fi
# Keep only this key's build tree (bounded disk use: a tree is ~1.5 GB).
for d in "$KROOT"/build-*; do
    [[ -d $d && $d != "$BUILD" ]] && rm -rf "$d"
done

# ---------------------------------------------------------------- configuration
# KCFLAGS: gcc compiles __init/__cold functions for size, and for size it expands memset/memcpy of
# unknown length inline as byte-wise `rep stosb`/`rep movsb` (32 + 29 sites), bypassing the kernel's
# CPU-selected memset/memcpy. Under PVM each rep iteration is emulated (~0.5 us per byte), so the
# 2 MiB per-cpu chunk zeroed in memblock_alloc_try_nid and clear_bss took ~9 % of boot samples
# (vmm run --profile). libcall makes every expansion gcc cannot do with a few moves a call instead.
KCFLAGS_VMM="-mstringop-strategy=libcall"
MAKE=(make -C "$SRC" ARCH=x86_64 -j"$(nproc)" KCFLAGS="$KCFLAGS_VMM")
FRAG="$BUILD/fragment.config"
# Strip the "# why" comments: "CONFIG_X=v  # ..." -> "CONFIG_X=v", "# CONFIG_X is not set  # ..." -> itself.
sed -nE -e 's/^(CONFIG_[A-Za-z0-9_]+=("[^"]*"|[^[:space:]#]*)).*$/\1/p' \
        -e 's/^# (CONFIG_[A-Za-z0-9_]+) is not set.*$/# \1 is not set/p' "$HERE/config" > "$FRAG"
log "configuring: tinyconfig + $(grep -c . "$FRAG") fragment options"
"${MAKE[@]}" tinyconfig >>"$BLOG" 2>&1 || die "make tinyconfig failed (see $BLOG)"
cat "$FRAG" >> "$SRC/.config"
"${MAKE[@]}" olddefconfig >>"$BLOG" 2>&1 || die "make olddefconfig failed (see $BLOG)"

bad=()
while IFS= read -r line; do
    if [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        grep -qE "^${BASH_REMATCH[1]}=[ym]$" "$SRC/.config" && bad+=("${BASH_REMATCH[1]} wanted off, got: $(grep -E "^${BASH_REMATCH[1]}=" "$SRC/.config")")
    elif ! grep -qxF -- "$line" "$SRC/.config"; then
        got="$(grep -E "^(# )?${line%%=*}[= ]" "$SRC/.config" || true)"
        bad+=("$line wanted, got: ${got:-absent (dependency missing?)}")
    fi
done < "$FRAG"
if ((${#bad[@]})); then
    printf '[kernel] config fragment not honoured by olddefconfig:\n' >&2
    printf '[kernel]   %s\n' "${bad[@]}" >&2
    exit 1
fi
log "config verified: every fragment option is in the final .config"

# ---------------------------------------------------------------- compile
log "make bzImage vmlinux (-j$(nproc)); full log: $BLOG"
set +e
"${MAKE[@]}" bzImage vmlinux 2>&1 | tee -a "$BLOG" | awk '
    / (CC|AS|AR|LD|OBJCOPY)/ { n++; if (n % 500 == 0) { printf "[kernel] %d objects built\n", n; fflush() } }
    /^ *(LD|KSYM|SYSMAP|OBJCOPY|ZOFFSET|VOFFSET|MKPIGGY|BUILD) / || /Kernel: / || /error:|Error / {
        sub(/^ +/, ""); print "[kernel] " $0; fflush() }'
rc=${PIPESTATUS[0]}
set -e
if ((rc != 0)); then
    tail -n 40 "$BLOG" | sed 's/^/[kernel] | /' >&2
    die "kernel build failed (exit $rc); full log: $BLOG"
fi

# ---------------------------------------------------------------- publish atomically
TMP="$(mktemp -d "$KROOT/.tmp-$KEY.XXXXXX")"
cp "$SRC/arch/x86/boot/bzImage" "$TMP/bzImage"
cp "$SRC/vmlinux" "$TMP/vmlinux"
cp "$SRC/System.map" "$TMP/System.map"
cp "$SRC/.config" "$TMP/config"
make -s -C "$SRC" ARCH=x86_64 kernelrelease > "$TMP/version"
chmod 755 "$TMP"
complete "$TMP" || die "artifacts incomplete in $TMP"
if [[ -e $OUT ]]; then            # --force: replace the old output
    mv "$OUT" "$KROOT/.old-$KEY.$$"
    rm -rf "$KROOT/.old-$KEY.$$"
fi
mv -T "$TMP" "$OUT"
log "built $(cat "$OUT/version") in $((SECONDS - start)) s: bzImage $(stat -c %s "$OUT/bzImage") bytes, vmlinux $(stat -c %s "$OUT/vmlinux") bytes"
printf '%s\n' "$OUT"
