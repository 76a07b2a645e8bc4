"""The search's accuracy runs on a Ray cluster (`onnxzero optimize --ray [ADDRESS]`).

What runs where: the normalized model and the calibration split go into Ray's object store once;
one actor per worker builds its own Engine from them (its sessions are built once per worker, as the
local search builds them once per process) and returns accuracy and MAC counts, for first-level
candidates and for network-level combinations. Everything else stays on the driver: the candidate
list, the resume cache, the network-level back-off (each step depends on the last), the held-out
check, and every latency figure. Latency is only ever measured on the driver's machine, each model
interleaved with the original in one process, so no two timings from different machines are compared.

Accuracy and MACs do not depend on where they are measured (the same sessions on the same data), so
the Ray search makes the same decisions as the local one; losses are taken against the driver's own
float-model accuracy all the same.

A worker that dies is restarted and its lost task retried (actor max_restarts / max_task_retries).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import onnxzero
from onnxzero.errors import UserError
from onnxzero.passes.sites import Site
from onnxzero.search.candidates import Candidate
from onnxzero.search.engine import Engine, Measured

INSTALL = "pip install onnxzero[ray]"
RESTARTS = 3       # a worker is restarted this often; each task lost with it is retried as often
IN_FLIGHT = 2      # tasks queued per worker, so that it never waits for the driver between two


def import_ray():
    """The ray module, or a one-line UserError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def _check_address(address: str) -> None:
    """Refuse an address no Ray cluster can be at before Ray tries it: ray.init retries an unreachable
    GCS for minutes, printing warnings, where a TCP connect says it in seconds."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--ray address {address!r}, expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise UserError(f"--ray: cannot reach a Ray cluster at {address} ({why}); "
                        "start one with `ray start --head` or give its address") from None


@contextlib.contextmanager
def _quiet_stderr(on: bool):
    """While connecting, Ray's C++ client logs each retry to file descriptor 2 (a minute of warnings
    when something that is not a Ray cluster answers); the error becomes one line instead. Not for a
    local start, whose daemons would inherit the redirection."""
    if not on:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Cluster:
    """A connection to Ray: a running cluster (`auto`, HOST:PORT, ray://HOST:PORT) or, with no address,
    a local one started here with one CPU per core (stopped again by close()). When Ray is already
    initialized in this process (a library caller, the tests), that instance is used as it is."""

    def __init__(self, address: str | None = None, *, workers: int | None = None, threads: int = 1,
                 num_cpus: int | None = None):
        ray = self.ray = import_ray()
        if workers is not None and workers < 1:
            raise UserError(f"--ray-workers is {workers}, expected >= 1")
        self.workers, self.threads = workers, max(1, threads)
        self.owned = False
        if not ray.is_initialized():
            self._init(address, num_cpus)
        try:
            self.size()  # --ray-workers must fit, before any work
        except UserError:
            self.close()
            raise

    def _init(self, address: str | None, num_cpus: int | None) -> None:
        ray = self.ray
        kw: dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False)
        if address:
            if address != "auto" and not address.startswith("ray://"):
                _check_address(address)
            kw["address"] = address
        else:
            kw.update(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
        try:
            # Ray puts the driver's working directory first on every worker's sys.path; run from a
            # source checkout, the workers would import its onnxzero/ (which has no passes/ or cli/:
            # only the install maps them into the package) instead of the installed one.
            with _quiet_stderr(bool(address)), contextlib.chdir(Path(onnxzero.__file__).resolve().parent.parent):
                ray.init(**kw)
        except Exception as e:  # ConnectionError, ValueError (ray:// without ray[client]), RuntimeError ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = f"at {address}" if address else "locally"
            raise UserError(f"--ray: cannot connect to a Ray cluster {where}: {first}") from None
        self.owned = True

    def size(self) -> int:
        """Workers a pool gets: --ray-workers, else one per `threads` CPUs of the cluster."""
        fit = int(self.ray.cluster_resources().get("CPU", 0)) // self.threads
        if self.workers and self.workers > fit:
            # an actor that cannot be placed would hold its queued candidates forever
            raise UserError(f"--ray-workers is {self.workers}, but the Ray cluster has room for {fit} "
                            f"(one CPU each); expected at most {fit}")
        return self.workers or max(1, fit)

    def pool(self, base: onnx.ModelProto, sites: list[Site], x: np.ndarray, ref: np.ndarray) -> "RemotePool":
        return RemotePool(self, base, sites, x, ref)

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False


class _Worker:
    """One Ray actor: an Engine over the object store's model and calibration split, built on its
    first task and kept for the rest.

    The data's object refs come with every task, nested in a list (Ray passes them on unresolved),
    not as constructor arguments: a restarted actor then rebuilds its Engine from the retried task,
    and Ray need not keep constructor arguments alive for restarts (ray-project/ray#53727)."""

    def __init__(self, sites: list[Site], threads: int):
        self.sites, self.threads, self.engine = sites, threads, None

    def _engine(self, data: list) -> Engine:
        if self.engine is None:
            import ray

            model, x, ref = ray.get(data)
            self.engine = Engine(onnx.load_from_string(model), self.sites, x, ref, threads=self.threads)
        return self.engine

    def pid(self) -> int:
        return os.getpid()

    def measure(self, data: list, c: Candidate) -> Measured:
        return self._engine(data).measure(c)

    def combination(self, data: list, config: dict[str, dict[str, Any]], with_model: bool) -> tuple[bytes | None, float, int]:
        model, acc, macs = self._engine(data).combination(config)
        return (model.SerializeToString() if with_model else None), acc, macs


class RemotePool:
    """The search's two measurements on Ray actors: first-level candidates (in parallel, results as
    they complete) and network-level combinations (one, or a round of the seeds' walks at once)."""

    def __init__(self, cluster: Cluster, base: onnx.ModelProto, sites: list[Site], x: np.ndarray, ref: np.ndarray):
        ray = self.ray = cluster.ray
        actor = ray.remote(num_cpus=cluster.threads, max_restarts=RESTARTS, max_task_retries=RESTARTS)(_Worker)
        # once into the object store; every worker (and every restart of one) reads them from there
        self.data = [ray.put(base.SerializeToString()), ray.put(np.ascontiguousarray(x)), ray.put(ref)]
        self.actors = [actor.remote(sites, cluster.threads) for _ in range(cluster.size())]
        self._next = 0

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
            if isinstance(cause, UserError):
                raise cause from None
            raise
        except self.ray.exceptions.RayActorError as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"a Ray worker died {RESTARTS + 1} times ({first[:200]}); what was measured is kept, "
                            "rerun with --resume to continue") from None

    def measure(self, cands: Iterable[Candidate]) -> Iterator[Measured]:
        """Each candidate's Measured, in the order they complete (the caller keys them)."""
        todo = iter(cands)
        pending: dict[Any, Any] = {}

        def submit(actor) -> None:
            c = next(todo, None)
            if c is not None:
                pending[actor.measure.remote(self.data, c)] = actor

        for _ in range(IN_FLIGHT):
            for a in self.actors:
                submit(a)
        try:
            while pending:
                (done,), _ = self.ray.wait(list(pending), num_returns=1)
                actor = pending.pop(done)
                m = self._get(done)
                submit(actor)
                yield m
        finally:
            for ref in pending:  # interrupted: what is queued is not wanted any more
                self.ray.cancel(ref)

    def combination(self, config: dict[str, dict[str, Any]], with_model: bool) -> tuple[onnx.ModelProto | None, float, int]:
        """(deployed model if asked for, calibration accuracy, MACs of the sites' ops) on the next worker."""
        a = self.actors[self._next % len(self.actors)]
        self._next += 1
        model, acc, macs = self._get(a.combination.remote(self.data, config, with_model))
        return (onnx.load_from_string(model) if model is not None else None), acc, macs

    def combinations(self, configs: list[dict[str, dict[str, Any]]], with_model: bool
                     ) -> list[tuple[onnx.ModelProto | None, float, int]]:
        """combination() of several configs at once, spread over the workers, in the given order."""
        refs = []
        for config in configs:
            a = self.actors[self._next % len(self.actors)]
            self._next += 1
            refs.append(a.combination.remote(self.data, config, with_model))
        out = []
        for ref in refs:
            model, acc, macs = self._get(ref)
            out.append(((onnx.load_from_string(model) if model is not None else None), acc, macs))
        return out

    def pids(self) -> list[int]:
        return [self.ray.get(a.pid.remote()) for a in self.actors]

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
