"""A real single-node Ceph cluster with an S3 endpoint, for the tests.

It is started by tools/ceph-s3.sh (the same script a person uses by hand), so the
tests and the README describe one cluster.  memstore: everything is in RAM and
gone at stop, so every run starts fresh and tests keep their objects small.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "ceph-s3.sh")
PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-authtool", "radosgw-admin", "ceph", "curl", "openssl")
INSTALL_HINT = "run tools/install.sh --test (it installs ceph-mon ceph-osd radosgw ceph-common curl openssl)"
PORTS_PER_CLUSTER = 50   # tools/ceph-s3.sh uses BASE..BASE+49


def missing_tools() -> list[str]:
    return [tool for tool in PACKAGES if shutil.which(tool) is None]


def missing_message() -> str:
    """Why the S3 tests cannot run here ("" when they can)."""
    missing = missing_tools()
    if not missing:
        return ""
    return (f"the S3 tests need a Ceph cluster but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(first: int = 20000, last: int = 40000) -> int:
    """A PORT_BASE whose whole range is free now; random start so parallel runs
    (other helpers, other test sessions) rarely even try the same range."""
    import random
    span = (last - first) // PORTS_PER_CLUSTER
    for _ in range(200):
        base = first + random.randrange(span) * PORTS_PER_CLUSTER
        if all(_port_free(base + i) for i in (0, 1, 2)) and all(
                _port_free(base + i) for i in range(10, PORTS_PER_CLUSTER)):
            return base
    raise RuntimeError("no free port range for a Ceph cluster")


class CephCluster:
    """One cluster: ``start`` it, hand ``env()`` to the CLI, ``stop`` it (always)."""

    region = "us-east-1"

    def __init__(self) -> None:
        self.dir: str | None = None
        self.port_base: int | None = None
        self.endpoint = ""
        self.access_key = ""
        self.secret_key = ""
        self.start_seconds = 0.0
        self._watchdog: subprocess.Popen | None = None
        self.tls_endpoint = ""      # https://127.0.0.1:BASE+3, its certificate self-signed:
        self.ca_file = ""           # the CA file that trusts it

    def start(self, directory: str, port_base: int) -> "CephCluster":
        if missing_message():
            raise RuntimeError(missing_message())
        self.dir, self.port_base = directory, port_base
        t0 = time.monotonic()
        proc = subprocess.run([SCRIPT, "up", directory, str(port_base)], capture_output=True, text=True,
                              timeout=300)
        self.start_seconds = time.monotonic() - t0
        if proc.returncode != 0:
            log = self._log_tail()
            self.stop()
            raise RuntimeError(f"tools/ceph-s3.sh up failed ({proc.returncode}): {proc.stderr.strip()}\n{log}")
        # If this process dies without stop() (SIGKILL, a crash), a watchdog of its own brings the
        # cluster down: memstore daemons left behind would hold their RAM until the machine stops.
        self._watchdog = subprocess.Popen(
            ["sh", "-c", 'while kill -0 "$0" 2>/dev/null; do sleep 2; done; exec "$1" down "$2"',
             str(os.getpid()), SCRIPT, directory],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        values = dict(line.split("=", 1) for line in open(os.path.join(directory, "s3.env")).read().split())
        self.endpoint = values["BLOCKVAULT_S3_ENDPOINT"]
        self.access_key = values["BLOCKVAULT_S3_ACCESS_KEY_ID"]
        self.secret_key = values["BLOCKVAULT_S3_SECRET_ACCESS_KEY"]
        self.tls_endpoint = open(os.path.join(directory, "tls", "endpoint")).read().strip()
        self.ca_file = os.path.join(directory, "tls", "cert.pem")
        return self

    @property
    def rgw_port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def env(self) -> dict[str, str]:
        return {"BLOCKVAULT_S3_ENDPOINT": self.endpoint, "BLOCKVAULT_S3_ACCESS_KEY_ID": self.access_key,
                "BLOCKVAULT_S3_SECRET_ACCESS_KEY": self.secret_key, "BLOCKVAULT_S3_REGION": self.region}

    def client(self):
        """A plain boto3 client of the test user (for setting up and for looking behind the store)."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required",
                                          connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}))

    def _rgw_pid(self) -> int | None:
        try:
            pid = int(open(os.path.join(self.dir, "run", "client.rgw.a.pid")).read().strip())
        except (OSError, ValueError):
            return None
        try:
            return pid if open(f"/proc/{pid}/comm").read().strip() == "radosgw" else None
        except OSError:
            return None

    def kill_rgw(self) -> None:
        """SIGKILL radosgw (a crash, not a shutdown) and wait until it is gone."""
        pid = self._rgw_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and \
                open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            time.sleep(0.05)

    def restart_rgw(self) -> None:
        """Start radosgw again (after kill_rgw) and wait until it answers."""
        self.kill_rgw()
        env = dict(os.environ, CEPH_CONF=os.path.join(self.dir, "ceph.conf"))
        subprocess.run(["radosgw", "-n", "client.rgw.a"], env=env, check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.rgw_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"radosgw did not come back on {self.endpoint}")

    def _log_tail(self) -> str:
        out = []
        for name in ("setup.log", "client.rgw.a.log", "osd.0.log", "mon.a.log"):
            path = os.path.join(self.dir or "/nonexistent", "log", name)
            if os.path.exists(path):
                out.append(f"--- {name}\n" + "".join(open(path, errors="replace").readlines()[-15:]))
        return "\n".join(out)

    def stop(self) -> None:
        if self.dir and os.path.isdir(self.dir):
            subprocess.run([SCRIPT, "down", self.dir], capture_output=True, timeout=120)
        if self._watchdog is not None:
            self._watchdog.terminate()
            self._watchdog.wait()
            self._watchdog = None


def s3env_of(cluster, **extra) -> dict:
    """The CLI's environment for ``cluster``: its endpoint and keys, and short bounded waits
    (two attempts, 3 s to connect, 20 s to answer), so a test never waits long on a fault."""
    env = dict(os.environ)
    env.update(cluster.env())
    env.update({"BLOCKVAULT_S3_MAX_ATTEMPTS": "2", "BLOCKVAULT_S3_CONNECT_TIMEOUT": "3",
                "BLOCKVAULT_S3_READ_TIMEOUT": "20"})
    env.update(extra)
    return env
