#!/usr/bin/env bash
# The test command: runs the whole test suite on a fresh machine with nothing set up by hand.
#
#   tools/test.sh [extra cargo test args]
#
# - Postgres: uses KILN_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test) when
#   it answers; otherwise starts a throwaway cluster (initdb + pg_ctl, trust auth, a free port)
#   in a temporary folder, and removes it when the tests end. Needs PostgreSQL's server programs
#   (Debian/Ubuntu: apt install postgresql; macOS: brew install postgresql).
# - S3: the real S3-compatible test server `s3s-fs` is installed once with cargo into
#   target/tools/ when it is neither on PATH nor in ~/.cargo/bin.
# - Chromium: the web UI's browser tests need `chromium` and `chromedriver` on PATH (Debian:
#   apt install chromium chromium-driver; .ci/run installs them).
# - Windows: when rustup's x86_64-pc-windows-gnu target, mingw-w64 (x86_64-w64-mingw32-gcc) and
#   Wine are installed, builds kiln.exe and sets KILN_TEST_WINDOWS_EXE for the Wine tests
#   (cli/tests/cli/wine.rs; KILN_TEST_WINDOWS=0 skips the build). .ci/run installs all three.
# - Deploy: the end-to-end test of deploy/compose.yaml (cli/tests/cli/deploy.rs) needs the
#   `garage` binary (cargo install --locked garage@2.5.0; .ci/run installs it) and PyYAML, and
#   fails without them; KILN_TEST_DEPLOY=0 skips it.
# - Then: cargo test --workspace --locked.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "tools/test.sh: $*" >&2; }

# --- S3 test server ---------------------------------------------------------------------------
if [ -z "${KILN_TEST_S3S_FS:-}" ]; then
    if command -v s3s-fs >/dev/null 2>&1; then
        KILN_TEST_S3S_FS="$(command -v s3s-fs)"
    elif [ -x "$HOME/.cargo/bin/s3s-fs" ]; then
        KILN_TEST_S3S_FS="$HOME/.cargo/bin/s3s-fs"
    else
        if [ ! -x target/tools/bin/s3s-fs ]; then
            log "installing the S3 test server s3s-fs into target/tools (once)"
            cargo install --locked --root target/tools s3s-fs@0.14.1 --features binary
        fi
        KILN_TEST_S3S_FS="$PWD/target/tools/bin/s3s-fs"
    fi
fi
export KILN_TEST_S3S_FS

# --- The Windows build, for the Wine tests -----------------------------------------------------
if [ -z "${KILN_TEST_WINDOWS_EXE:-}" ] && [ "${KILN_TEST_WINDOWS:-1}" != 0 ] \
    && command -v wine >/dev/null 2>&1 && command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 \
    && rustup target list --installed 2>/dev/null | grep -qx x86_64-pc-windows-gnu; then
    log "building kiln.exe (x86_64-pc-windows-gnu) for the Wine tests"
    cargo build --locked --target x86_64-pc-windows-gnu -p kiln-cli
    # Wine 8's missing bcryptprimitives.dll (Rust's randomness on Windows 10+): a stand-in
    # beside kiln.exe (tools/wine/bcryptprimitives.c).
    # Where cargo put it: CARGO_TARGET_DIR when set (absolute or relative to here), else target/.
    windows_out="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/x86_64-pc-windows-gnu/debug"
    x86_64-w64-mingw32-gcc -shared -O2 -o "$windows_out/bcryptprimitives.dll" \
        tools/wine/bcryptprimitives.c -lbcrypt
    export KILN_TEST_WINDOWS_EXE="$windows_out/kiln.exe"
fi

# --- Postgres ---------------------------------------------------------------------------------
url="${KILN_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
hostport="${url#*@}"
hostport="${hostport%%/*}"
host="${hostport%%:*}"
port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=5432

pg_bin() {
    # initdb and pg_ctl are often off PATH (Debian keeps them per version).
    if command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
        return
    fi
    ls -1d /usr/lib/postgresql/*/bin/"$1" /usr/local/opt/postgresql*/bin/"$1" \
        /opt/homebrew/opt/postgresql*/bin/"$1" 2>/dev/null | sort -V | tail -1
}

answers() {
    local psql
    psql="$(pg_bin psql)"
    if [ -n "$psql" ]; then
        "$psql" "$1" -tAc 'SELECT 1' >/dev/null 2>&1
    else
        (exec 3<>"/dev/tcp/$2/$3") 2>/dev/null
    fi
}

cleanup() { :; }
if answers "$url" "$host" "$port"; then
    log "Postgres at $hostport answers"
else
    initdb="$(pg_bin initdb)"
    pg_ctl="$(pg_bin pg_ctl)"
    if [ -z "$initdb" ] || [ -z "$pg_ctl" ]; then
        log "no Postgres answers at $hostport and PostgreSQL's initdb/pg_ctl are not installed"
        log "install them (Debian/Ubuntu: apt install postgresql) or set KILN_TEST_DATABASE_URL"
        exit 1
    fi
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/kiln-test-pg.XXXXXX")"
    # A free port: let the kernel pick one.
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    as_owner=()
    if [ "$(id -u)" = 0 ]; then
        # initdb refuses to run as root: the cluster belongs to the postgres user.
        chown postgres "$tmp"
        as_owner=(runuser -u postgres --)
    fi
    log "starting a throwaway Postgres in $tmp on 127.0.0.1:$port"
    "${as_owner[@]}" "$initdb" -D "$tmp/data" -U postgres --auth=trust -E UTF8 >"$tmp/initdb.log" 2>&1 ||
        { cat "$tmp/initdb.log" >&2; exit 1; }
    "${as_owner[@]}" "$pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w \
        -o "-h 127.0.0.1 -p $port -k $tmp -c fsync=off -c max_connections=200" start >/dev/null ||
        { cat "$tmp/server.log" >&2; exit 1; }
    cleanup() {
        "${as_owner[@]}" "$pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$tmp"
    }
    trap cleanup EXIT
    "$(pg_bin createdb)" -h 127.0.0.1 -p "$port" -U postgres test
    url="postgres://postgres@127.0.0.1:$port/test"
fi
export KILN_TEST_DATABASE_URL="$url"

# --- The suite --------------------------------------------------------------------------------
status=0
cargo test --workspace --locked "$@" || status=$?
cleanup
trap - EXIT
exit "$status"
