"""Shared test helpers: compose configs with Hydra's compose API and run the CLI as a
real subprocess on tiny data (x0.25 width, 32 px, a few dozen fake images)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mbv2.config import register_configs
from mbv2.rundirs import register_resolvers
from mbv2.runtime import configure_process

configure_process()  # as every entry point does, before a test imports paddle

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"

# the smallest run that still exercises every part of the loop
TINY = [
    "model.scale=0.25",
    "data=fake",
    "data.num_samples=48",
    "data.num_val_samples=20",
    "data.num_classes=4",
    "data.image_size=32",
    "trainer.batch_size=16",
    "trainer.log_freq=1",
    "trainer.verbose=0",
]


# Math threads for the op tests: what every run uses on this machine's 2 cores (entry
# points set them; a bare Paddle process computes on one, and the ops' thread splits and
# per-thread partial sums would go untested).
OP_TEST_THREADS = 2


@pytest.fixture(scope="module")
def op_threads():
    from mbv2.runtime import set_cpu_threads

    set_cpu_threads(OP_TEST_THREADS)
    yield OP_TEST_THREADS
    set_cpu_threads(1)  # a bare process's count, for the modules after


@pytest.fixture(scope="module")
def kernel():
    """The op library, built or loaded (skips where no C++ compiler is present)."""
    from mbv2.ops import depthwise as dw

    if dw._compiler() is None:
        pytest.skip("no C++ compiler: the op cannot be built here")
    k = dw.load_kernel()
    assert k is not None, "the op library failed to build although a compiler is present"
    return k


def compose_config(overrides: list[str] | None = None, return_hydra_config: bool = False):
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=overrides or [], return_hydra_config=return_hydra_config)


@pytest.fixture
def cfg_factory():
    yield compose_config
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path, module: str = "mbv2.run", timeout: int = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """`python -m <module> args` in `cwd`, as a user would type it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def visualdl_server(logdir: str | Path, cwd: Path, log_file: Path | None = None):
    """A real `visualdl --logdir ... --language en` on 127.0.0.1; yields its base URL once
    `/alive` answers, stops the server's process group afterwards."""
    import signal
    import time
    import urllib.request

    exe = Path(sys.executable).parent / "visualdl"
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([str(exe), "--logdir", str(logdir), "--host", "127.0.0.1",
                             "--port", str(port := free_port()), "--language", "en",
                             "--disable-telemetry"], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/alive", timeout=2) as resp:
                    if resp.status in (200, 204):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                tail = log_file.read_text(errors="replace")[-3000:] if log_file else ""
                pytest.fail(f"visualdl did not answer /alive within 60 s\n{tail}")
            time.sleep(0.3)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if log_file:
            out.close()

