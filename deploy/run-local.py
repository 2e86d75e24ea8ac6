#!/usr/bin/env python3
"""Starts the services of deploy/compose.yaml natively, on a machine without a container engine.

Usage:
  deploy/run-local.py [--env-file deploy/.env] [--state DIR] [--profile cpu-worker]
                      [--kiln PATH] [--garage PATH] [--free-ports] [--ready-file FILE]

It reads compose.yaml itself (PyYAML: `pip install pyyaml`), so the two cannot drift: each
service runs its own command, environment and healthcheck, in `depends_on` order, with
  - images as local programs: `postgres:*` as PostgreSQL's own initdb/postgres (the official
    image's first start emulated: a cluster in the volume, role POSTGRES_USER with
    POSTGRES_PASSWORD, database POSTGRES_DB), `dxflrs/garage:*`'s `/garage` as the `garage`
    binary (--garage, else PATH or ~/.cargo/bin), the kiln image's `kiln` as --kiln (default
    target/release/kiln, else target/debug/kiln);
  - named volumes as folders under --state (default deploy/.local), bind mounts as their host
    paths; a bind-mounted file (garage.toml) is copied there with the rewrites below, mode 600;
  - every service on 127.0.0.1: a published port on its host port, any other port that
    `expose` names on a free port (--free-ports: every port free), and `SERVICE:PORT`,
    `0.0.0.0:PORT`, `[::]:PORT` in commands, environments and mounted files rewritten to match.
It then runs in the foreground until SIGINT/SIGTERM, and stops the services in reverse order
(with their stop signal: SIGINT for Postgres, as its image says, else SIGTERM; SIGKILL after
30 s). `restart` is not emulated: when a service exits, the others are stopped and the script
exits 1. --ready-file gets, once every service is healthy, a JSON object:
{"ports": {"SERVICE": {"CONTAINER_PORT": LOCAL_PORT}}, "pids": {"SERVICE": PID}}.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

try:
    import yaml
except ImportError:
    sys.exit("run-local.py: needs PyYAML (pip install pyyaml, or apt install python3-yaml)")

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent


def log(msg):
    print(f"run-local: {msg}", file=sys.stderr, flush=True)


# --- compose.yaml: .env, interpolation, profiles, order ---------------------------------------


def read_env_file(path):
    env = {}
    if not path.is_file():
        return env
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env):
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `$$`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        got = env.get(name)
        missing = got is None or (op is not None and op.startswith(":") and got == "")
        if op and op.endswith("-") and missing:
            return arg
        if op and op.endswith("?") and missing:
            sys.exit(f"run-local.py: {name}: {arg or 'not set'}")
        return got or ""

    return VAR.sub(one, value)


def ordered(services):
    """Service names, each after everything it depends on."""
    done, out = set(), []

    def visit(name, path):
        if name in done:
            return
        if name in path:
            sys.exit(f"run-local.py: depends_on cycle through {name}")
        for dep in services[name].get("depends_on", {}):
            visit(dep, path + [name])
        done.add(name)
        out.append(name)

    for name in services:
        visit(name, [])
    return out


# --- images as local programs -----------------------------------------------------------------


def pg_bin(name):
    if shutil.which(name):
        return shutil.which(name)
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not found:
        sys.exit(f"run-local.py: PostgreSQL's {name} is not installed (apt install postgresql)")
    return str(found[-1])


def programs(args):
    garage = args.garage or shutil.which("garage") or str(Path.home() / ".cargo/bin/garage")
    if not Path(garage).is_file():
        sys.exit("run-local.py: no `garage` (cargo install --locked garage@2.5.0, or --garage PATH)")
    kiln = args.kiln
    if not kiln:
        kiln = next((str(p) for p in (ROOT / "target/release/kiln", ROOT / "target/debug/kiln") if p.is_file()), None)
    if not kiln or not Path(kiln).is_file():
        sys.exit("run-local.py: no kiln binary (cargo build --release -p kiln-cli, or --kiln PATH)")
    return {"/garage": garage, "kiln": kiln, "pg_isready": pg_bin("pg_isready")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one service ------------------------------------------------------------------------------


class Service:
    def __init__(self, name, spec, ports, volumes, state):
        self.name, self.spec, self.ports = name, spec, ports
        self.proc = None
        self.mounts = []  # (container path, host path), longest container path first
        for v in spec.get("volumes", []):
            if not isinstance(v, str):
                sys.exit(f"run-local.py: {name}: only short volume syntax (SRC:TARGET[:ro])")
            src, target = v.split(":")[:2]
            if src.startswith((".", "/", "~")):
                host = (DEPLOY / os.path.expanduser(src)).resolve()
                if host.is_file():
                    copy = state / "files" / name / host.name
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    copy.write_text(host.read_text())  # rewritten below, once mounts are known
                    os.chmod(copy, 0o600)
                    host = copy
            else:
                if src not in volumes:
                    sys.exit(f"run-local.py: {name}: volume {src} is not declared")
                host = state / "volumes" / src
                host.mkdir(parents=True, exist_ok=True)
            self.mounts.append((target, str(host)))
        self.mounts.sort(key=lambda m: -len(m[0]))
        for target, host in self.mounts:
            if host.startswith(str(state / "files")):
                Path(host).write_text(self.rewrite(Path(host).read_text()))

    def rewrite(self, text):
        for port, local in self.ports[self.name].items():
            text = re.sub(rf"(?:0\.0\.0\.0|\[::\]|127\.0\.0\.1|localhost):{port}(?!\d)", f"127.0.0.1:{local}", text)
        for other, ports in self.ports.items():
            for port, local in ports.items():
                text = re.sub(rf"(?<![\w.-]){re.escape(other)}:{port}(?!\d)", f"127.0.0.1:{local}", text)
        for target, host in self.mounts:
            text = re.sub(rf"(?<![\w.-]){re.escape(target)}(?=/|$|[^\w.-])", host, text)
        return text

    def environment(self):
        env = self.spec.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        out = dict(os.environ)
        out.update({k: self.rewrite(str(v)) for k, v in env.items()})
        return out

    def argv(self, cmd, progs):
        cmd = [self.rewrite(str(c)) for c in cmd]
        if cmd[0] not in progs:
            sys.exit(f"run-local.py: {self.name}: no local program for {cmd[0]!r}")
        return [progs[cmd[0]]] + cmd[1:]

    def start(self, progs, logs):
        out = open(logs / f"{self.name}.log", "ab")
        if self.spec["image"].startswith("postgres:"):
            argv = self.postgres_argv()
        else:
            argv = self.argv(self.spec["command"], progs)
        log(f"{self.name}: {' '.join(argv)}")
        self.proc = subprocess.Popen(
            argv, env=self.environment(), stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
        )
        if self.spec["image"].startswith("postgres:"):
            self.postgres_first_start()

    # The official postgres image: initdb on first start, POSTGRES_* role and database.
    def postgres_argv(self):
        env = self.environment()
        data = Path(dict(self.mounts)["/var/lib/postgresql/data"])
        self.as_owner = []
        if os.getuid() == 0:  # initdb and postgres refuse root: the cluster is postgres's
            self.as_owner = ["runuser", "-u", "postgres", "--"]
            shutil.chown(data, "postgres")
        self.fresh = not (data / "PG_VERSION").exists()
        if self.fresh:
            pw = data.parent / f".{self.name}-pw"
            pw.write_text(env["POSTGRES_PASSWORD"] + "\n")
            if self.as_owner:
                shutil.chown(pw, "postgres")
            subprocess.run(
                self.as_owner
                + [pg_bin("initdb"), "-D", str(data), "-U", env.get("POSTGRES_USER", "postgres"), "-E", "UTF8",
                   f"--pwfile={pw}", "--auth-host=scram-sha-256", "--auth-local=peer"],
                check=True, stdout=subprocess.DEVNULL,
            )
            pw.unlink()
        port = self.ports[self.name]["5432"]
        return self.as_owner + [pg_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)]

    def postgres_first_start(self):
        env = self.environment()
        user = env.get("POSTGRES_USER", "postgres")
        db = env.get("POSTGRES_DB", user)
        if not self.fresh or db == "postgres":  # initdb made `postgres`; the image makes the rest
            return
        conn = ["-h", "127.0.0.1", "-p", str(self.ports[self.name]["5432"]), "-U", user]
        env["PGPASSWORD"] = env["POSTGRES_PASSWORD"]
        for _ in range(300):
            if subprocess.run([pg_bin("pg_isready")] + conn, stdout=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.1)
        subprocess.run([pg_bin("createdb")] + conn + [db], env=env, check=True)

    def healthy(self, progs):
        check = self.spec.get("healthcheck")
        if not check:
            return True
        test = check["test"]
        if test[0] != "CMD":
            sys.exit(f"run-local.py: {self.name}: only exec-form healthchecks ([\"CMD\", ...])")
        env = self.environment()
        if self.spec["image"].startswith("postgres:"):  # in the container: its own socket
            env.update(PGHOST="127.0.0.1", PGPORT=str(self.ports[self.name]["5432"]))
        try:
            r = subprocess.run(self.argv(test[1:], progs), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=seconds(check.get("timeout", "30s")))
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    def wait_healthy(self, progs):
        check = self.spec.get("healthcheck", {})
        interval = seconds(check.get("interval", "5s"))
        tries = int(check.get("retries", 3)) + 10  # the first start may initialise (initdb)
        for _ in range(tries):
            if self.proc.poll() is not None:
                sys.exit(f"run-local.py: {self.name} exited ({self.proc.returncode}); see its log")
            if self.healthy(progs):
                log(f"{self.name}: healthy")
                return
            time.sleep(interval)
        sys.exit(f"run-local.py: {self.name} did not become healthy")

    def stop(self):
        if not self.proc or self.proc.poll() is not None:
            return
        # The official postgres image stops with SIGINT (a fast shutdown); others with SIGTERM.
        default = "SIGINT" if self.spec["image"].startswith("postgres:") else "SIGTERM"
        os.killpg(self.proc.pid, getattr(signal, self.spec.get("stop_signal", default)))
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        log(f"{self.name}: stopped ({self.proc.returncode})")


def seconds(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(s))
    n = float(m.group(1))
    return n / 1000 if m.group(2) == "ms" else n * 60 if m.group(2) == "m" else n


# --- main -------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compose", type=Path, default=DEPLOY / "compose.yaml")
    p.add_argument("--env-file", type=Path, default=DEPLOY / ".env")
    p.add_argument("--state", type=Path, default=DEPLOY / ".local")
    p.add_argument("--profile", action="append", default=[])
    p.add_argument("--kiln")
    p.add_argument("--garage")
    p.add_argument("--free-ports", action="store_true")
    p.add_argument("--ready-file", type=Path)
    args = p.parse_args()

    env = read_env_file(args.env_file)
    env.update(os.environ)
    compose = interpolate(yaml.safe_load(args.compose.read_text()), env)
    services = {
        n: s for n, s in compose["services"].items() if not s.get("profiles") or set(s["profiles"]) & set(args.profile)
    }
    progs = programs(args)
    state = args.state.resolve()
    (state / "logs").mkdir(parents=True, exist_ok=True)

    ports = {}
    for name, spec in services.items():
        published = {}
        for mapping in spec.get("ports", []):
            host, container = str(mapping).rsplit(":", 1)
            published[container] = int(host.rsplit(":", 1)[-1])
        ports[name] = {
            str(c): free_port() if args.free_ports or str(c) not in published else published[str(c)]
            for c in spec.get("expose", [])
        }
    order = ordered(services)
    running = []

    def stop_all(*_):
        for svc in reversed(running):
            svc.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    try:
        for name in order:
            svc = Service(name, services[name], ports, compose.get("volumes") or {}, state)
            for dep, cond in (services[name].get("depends_on") or {}).items():
                if (cond or {}).get("condition", "service_started") == "service_healthy":
                    next(s for s in running if s.name == dep).wait_healthy(progs)
            svc.start(progs, state / "logs")
            running.append(svc)
        for svc in running:
            svc.wait_healthy(progs)
    except SystemExit as e:
        for svc in reversed(running):
            svc.stop()
        raise e
    for name, local in ports.items():
        for container, port in local.items():
            log(f"{name}:{container} is 127.0.0.1:{port}")
    if args.ready_file:
        ready = {"ports": ports, "pids": {s.name: s.proc.pid for s in running}}
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.rename(args.ready_file)
    log(f"ready (logs in {state / 'logs'}); Ctrl-C stops every service")
    while True:
        for svc in running:
            if svc.proc.poll() is not None:
                log(f"{svc.name} exited ({svc.proc.returncode}); stopping the rest")
                running.remove(svc)
                for other in reversed(running):
                    other.stop()
                sys.exit(1)
        time.sleep(1)


if __name__ == "__main__":
    main()
