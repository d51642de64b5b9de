"""Helpers shared by the peerd benchmarks (python3 stdlib only).

Servers are started in their own session and remembered in a module-level list; `cleanup()`
(run from `finally`, atexit and SIGINT/SIGTERM/SIGHUP handlers) stops each of them by pid, and
removes the temp directories registered with `tempdir()`.
"""
import atexit
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench")
RESULTS = os.path.join(BENCH, "results")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20

_procs = []  # (name, Popen)
_tmpdirs = []
_cleaned = False


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peerd_bin():
    if os.environ.get("PEERD_BIN"):
        return os.environ["PEERD_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/peerd/target")
    return os.path.join(target, "release", "peerd")


def tempdir(prefix):
    d = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_TMPDIR", "/tmp"))
    _tmpdirs.append(d)
    return d


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ processes and CPU time

def _stat_fields(path):
    with open(path) as f:
        s = f.read()
    # comm may contain spaces and parentheses: fields start after the last ')'.
    return s[s.rindex(")") + 2:].split()


def proc_cpu_s(pid):
    """utime+stime of a whole process (all its threads, dead ones included), in seconds."""
    f = _stat_fields(f"/proc/{pid}/stat")
    return (int(f[11]) + int(f[12])) / CLK_TCK


def threads_cpu_s(pid):
    """{thread name: utime+stime seconds} of the live threads of a process (same names summed)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if int(_stat_fields(f"/proc/{d}/stat")[1]) == pid:
                kids.append(int(d))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return kids


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def cpu_times():
    """{cpuN: (busy_s, total_s)} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            p = line.split()
            v = [int(x) for x in p[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            total = sum(v[:8])
            out[p[0]] = ((total - idle) / CLK_TCK, total / CLK_TCK)
    return out


def background_load(interval=1.0):
    """Cores busy over `interval` seconds (the benchmark itself idle meanwhile: others' load)."""
    a = cpu_times()["cpu"]
    time.sleep(interval)
    b = cpu_times()["cpu"]
    return (b[0] - a[0]) / interval


def wait_quiet(max_wait, threshold=0.3):
    """Waits (at most max_wait s) until the rest of the machine uses under `threshold` cores.
    Returns (seconds waited, last background load in cores)."""
    t0 = time.monotonic()
    load = background_load()
    warned = False
    while load > threshold and time.monotonic() - t0 < max_wait:
        if not warned:
            log(f"machine busy ({load:.2f} cores in use by others); waiting up to {max_wait:.0f} s for it to calm down")
            warned = True
        load = background_load()
    return round(time.monotonic() - t0, 1), round(load, 2)


def spawn(name, argv, logpath, cpu=None):
    """Starts a server in its own session (a Ctrl-C in the terminal reaches us, and we stop it)."""
    logf = open(logpath, "ab")
    pre = None
    if cpu is not None:
        def pre():
            os.sched_setaffinity(0, {cpu})
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                         start_new_session=True, preexec_fn=pre, close_fds=True)
    logf.close()
    _procs.append((name, p))
    return p


def stop(p, name="process", timeout=10):
    if p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {p.pid}) ignored SIGTERM for {timeout} s; killing it")
        p.kill()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {p.pid}) survived SIGKILL")
    except ProcessLookupError:
        pass


def cleanup():
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    for name, p in reversed(_procs):
        stop(p, name)
    for d in _tmpdirs:
        shutil.rmtree(d, ignore_errors=True)


def _on_signal(signum, _frame):
    log(f"got signal {signum}; cleaning up")
    cleanup()
    os._exit(128 + signum)


def install_cleanup():
    atexit.register(cleanup)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)


def http_ok(url, timeout=1.0, method="GET"):
    try:
        req = urllib.request.Request(url, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read(1 << 16)
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def wait_until(pred, timeout, what, proc=None, logpath=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = _tail(logpath)
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout} s\n{_tail(logpath)}")


def _tail(path, n=30):
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------ content

def make_blob(content_dir, size, chunk=16 * MiB):
    """Writes `size` random bytes to DIR/blobs/sha256/<their sha256>; returns the hex digest."""
    d = os.path.join(content_dir, "blobs", "sha256")
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{size}")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(chunk, left))
            h.update(b)
            f.write(b)
            left -= len(b)
    hexd = h.hexdigest()
    os.chmod(tmp, 0o644)
    os.rename(tmp, os.path.join(d, hexd))
    return hexd


def warm(path):
    """Reads a file once, so the page cache holds it."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


def chmod_path_readable(path):
    """nginx workers run unprivileged: make the temp content tree world-readable."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


# ------------------------------------------------------------------ servers

class Peerd:
    def __init__(self, workdir, content_dir, shards=1, engine=None, cpu=None, extra=(), bin=None, label=None):
        self.name = f"peerd-{label + '-' if label else ''}{engine or 'auto'}"
        self.dir = os.path.join(workdir, self.name)
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        self.http_port, self.prom_port, self.router_port = free_port(), free_port(), free_port()
        self.log = os.path.join(self.dir, "peerd.log")
        argv = [bin or peerd_bin(), "run", "--content-dir", content_dir, "--bootstrap", "none",
                "--http-addr", f"127.0.0.1:{self.http_port}", "--prom-addr", f"127.0.0.1:{self.prom_port}",
                "--router-addr", f"127.0.0.1:{self.router_port}", "--data-dir", os.path.join(self.dir, "data"),
                "--containerd-socket", "/nonexistent", "--shards", str(shards), *extra]
        if engine:
            argv += ["--io-engine", engine]
        self.argv = argv
        self.proc = spawn(self.name, argv, self.log, cpu=cpu)
        self.pid = self.proc.pid
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.prom_port}/healthz") == 200, 20,
                   f"{self.name} healthz", self.proc, self.log)
        wait_until(lambda: http_ok(f"{self.base()}/v2/") == 200, 20, f"{self.name} /v2/", self.proc, self.log)
        self.engine = self._engine_from_log()

    def _engine_from_log(self):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for line in _tail(self.log, 200).splitlines():
                if "data plane listening" in line and "engine=" in line:
                    return line.split("engine=", 1)[1].split()[0].strip('"')
            time.sleep(0.05)
        return "unknown"

    def base(self):
        return f"http://127.0.0.1:{self.http_port}"

    def url(self, hexd, name="bench/blob"):
        return f"{self.base()}/v2/{name}/blobs/sha256:{hexd}"

    def pids(self):
        return [self.pid]

    def cpu_s(self):
        return proc_cpu_s(self.pid)

    def stop(self):
        stop(self.proc, self.name)


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location = /v2/ {{ return 200 "{{}}"; }}
        location ~ "^/v2/.+/blobs/sha256:([0-9a-f]{{64}})$" {{
            alias {content}/blobs/sha256/$1;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, workdir, content_dir, cpu=None):
        self.name = "nginx"
        self.dir = os.path.join(workdir, "nginx")
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        self.http_port = free_port()
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=self.dir, port=self.http_port, content=content_dir))
        self.log = os.path.join(self.dir, "nginx.out")
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = spawn(self.name, [exe, "-p", self.dir, "-c", conf], self.log, cpu=cpu)
        self.pid = self.proc.pid
        wait_until(lambda: http_ok(f"{self.base()}/v2/") == 200, 20, "nginx /v2/", self.proc, self.log)
        self.engine = "epoll"

    def base(self):
        return f"http://127.0.0.1:{self.http_port}"

    def url(self, hexd, name="bench/blob"):
        return f"{self.base()}/v2/{name}/blobs/sha256:{hexd}"

    def pids(self):
        return [self.pid] + children(self.pid)

    def cpu_s(self):
        total = 0.0
        for pid in self.pids():
            try:
                total += proc_cpu_s(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def stop(self):
        stop(self.proc, self.name)


# ------------------------------------------------------------------ load

def httpload(url, streams, expect_size=None, duration=None, requests_per_stream=None, cpu=None, timeout=3600):
    argv = [sys.executable, os.path.join(BENCH, "lib", "httpload.py"), url, "--streams", str(streams)]
    if duration is not None:
        argv += ["--duration", str(duration)]
    if requests_per_stream is not None:
        argv += ["--requests-per-stream", str(requests_per_stream)]
    if expect_size is not None:
        argv += ["--expect-size", str(expect_size)]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _procs.append(("httpload", p))
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        _procs.remove(("httpload", p))
    if p.returncode != 0 or not out.strip():
        raise RuntimeError(f"httpload failed ({p.returncode}): {err.strip()[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------ reporting

def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return None
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(MiB), b""):
                h.update(b)
    except OSError:
        return None
    return h.hexdigest()


def host_info():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    bin_mtime = None
    try:
        bin_mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.stat(peerd_bin()).st_mtime))
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu": model, "cpus": os.cpu_count(),
            "loadavg": open("/proc/loadavg").read().split()[:3], "git": git_rev(),
            "peerd_bin": peerd_bin(), "peerd_bin_mtime": bin_mtime,
            "peerd_bin_sha256": (file_sha256(peerd_bin()) or "")[:16],
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(name, obj):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def table(rows, headers):
    cols = [headers] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(headers)),
             "  ".join("-" * w[i] for i in range(len(headers)))]
    for r in cols[1:]:
        lines.append("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)))
    return "\n".join(lines)
