"""optimize --ray: the search's accuracy runs on a real local Ray (issue 14).

One module-scoped Ray with 2 CPUs (this machine has 2 cores). The Ray search must give exactly the
local search's answer (config, accuracy, loss, MACs of every candidate and combination), survive a
worker killed mid-search, keep its cache on Ctrl-C, and refuse bad addresses in one line.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import default_sigint

from onnxzero import zoo
from onnxzero.cli.main import cli
from onnxzero.data import load_dataset
from onnxzero.load import load_model
from onnxzero.search import SearchOptions, optimize
from onnxzero.search.greedy import Progress

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install onnxzero[ray])")

from onnxzero.search.cluster import Cluster  # noqa: E402

TECHS = ("early-exit", "sparse-quant", "lazy")


@pytest.fixture(scope="module")
def local_ray():
    cluster = Cluster(num_cpus=2)  # ray.init(num_cpus=2, include_dashboard=False, ...) from the installed package's folder
    assert cluster.owned
    yield ray.get_runtime_context().gcs_address
    cluster.close()
    assert not ray.is_initialized()


def test_workers_import_the_installed_onnxzero(local_ray):
    """Not the source tree the tests run from (Ray puts the driver's working directory on the workers'
    sys.path; a non-editable install's source tree has no onnxzero/passes)."""
    import onnxzero
    from onnxzero import passes

    @ray.remote
    def where():
        import onnxzero
        from onnxzero import passes
        return onnxzero.__file__, passes.__file__

    assert ray.get(where.remote()) == (onnxzero.__file__, passes.__file__)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(zoo.path("mnist"))


@pytest.fixture(scope="module")
def lenet():
    return load_model("zoo:lenet5")


def search(lenet, mnist, cluster=None, **kw):
    return optimize(lenet, mnist.inputs[:400], mnist.labels[:400],
                    SearchOptions(eps=3.0, objective=kw.pop("objective", "macs"), techniques=kw.pop("techniques", TECHS)),
                    cluster=cluster, **kw)


@pytest.fixture(scope="module")
def local_result(lenet, mnist):
    return search(lenet, mnist)


def figures(result):
    """Everything the search decided and measured except wall-clock times."""
    rep = result.report
    return {
        "first_level": sorted((m.key, m.accuracy, m.loss, m.macs, m.dense_macs) for m in result.first_level),
        "combined": [(json.dumps(c.to_json()["config"], sort_keys=True), c.accuracy, c.loss, c.macs) for c in result.combined],
        "baseline": (rep["baseline"]["accuracy"], rep["baseline"]["macs"]),
        "optimized": (rep["optimized"]["accuracy"], rep["optimized"]["macs"]),
        "losses": (rep["validation_loss"], rep["calibration_loss"], rep["mac_reduction"]),
        "sites": rep["sites"], "decision": (rep["decision"]["choice"], rep["decision"]["written"], rep["met_eps"]),
    }


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def worker_pids(title: bytes = b"ray::_Worker") -> set[int]:
    """Processes of this test's Ray actors (Ray titles them ray::_Worker, ray::_Worker.measure while
    measuring), found in /proc: descendants of this process (its Ray's raylet started them), so
    another Ray on the machine does not count."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if not (d / "cmdline").read_bytes().split(b"\0")[0].startswith(title):
                    continue
                pid = int(d.name)
                while pid > 1 and pid != os.getpid():
                    pid = _ppid(pid)
                if pid == os.getpid():
                    out.add(int(d.name))
            except (OSError, ValueError):
                pass
    return out


def test_same_answer_as_the_local_search(local_ray, lenet, mnist, local_result):
    r = search(lenet, mnist, Cluster())
    assert figures(r) == figures(local_result)
    assert r.report["optimized"]["macs"] < r.report["baseline"]["macs"]  # it did find something
    # 2 sites: early exit's 3 boldest predictive settings each (all within eps 3, so the gentlest of the
    # 4 is never measured) + exact on the second (its input is >= 0); 5 prunings and 7 lazy ratios each
    # (too few of them within eps to stop early)
    assert len(r.first_level) == 7 + 10 + 14 and len(r.combined) >= 1


def test_workers_are_other_processes_and_measure_what_the_engine_does(local_ray, lenet, mnist):
    from onnxzero.passes.normalize import normalize
    from onnxzero.passes.sites import find_sites
    from onnxzero.search.engine import Engine
    from onnxzero.search.greedy import _candidates

    base, _ = normalize(lenet)
    sites = [s for s in find_sites(base) if s.macs]
    x, y = mnist.inputs[:200], mnist.labels[:200]
    engine = Engine(base, sites, x, y)
    cands = _candidates(engine, sites, SearchOptions(eps=3, techniques=("lazy", "sparse-quant")))
    pool = Cluster().pool(base, sites, x, y)
    try:
        pids = pool.pids()
        assert len(pids) == 2 and len(set(pids)) == 2 and os.getpid() not in pids
        remote = {m.key: m.to_json() for m in pool.measure(cands)}
        assert remote == {c.key: engine.measure(c).to_json() for c in cands}
        cfg = {sites[0].name: {"technique": "lazy", "ratio": 0.5}, sites[1].name: {"technique": "sparse-quant", "prune": 0.8}}
        model, acc, macs = pool.combination(cfg, True)
        local_model, local_acc, local_macs = engine.combination(cfg)
        assert (acc, macs) == (local_acc, local_macs) and macs < sum(s.macs for s in sites)
        assert model.SerializeToString() == local_model.SerializeToString()
        assert pool.combination(cfg, False)[0] is None  # the model travels only when latency needs it
    finally:
        pool.close()


class StepMeasurer:
    """Deterministic whole-model latency: 1 ms, minus 0.2 ms per sparse-quant site, plus 0.1 ms per other op."""

    def compare(self, model, original, sample, *, runs):
        ops = [n.op_type for n in model.graph.node if n.domain]
        return 1.0 - 0.2 * sum("SparseQuant" in o for o in ops) + 0.1 * sum("SparseQuant" not in o for o in ops), 1.0


def test_same_answer_with_objective_latency(local_ray, lenet, mnist):
    """Latency is measured on the driver (here an injected measurer) from the model a worker built."""
    a = search(lenet, mnist, objective="latency", techniques=("sparse-quant", "lazy"), measurer=StepMeasurer())
    b = search(lenet, mnist, Cluster(), objective="latency", techniques=("sparse-quant", "lazy"), measurer=StepMeasurer())
    assert figures(a) == figures(b)
    assert [c.ratio for c in a.combined] == [c.ratio for c in b.combined]
    # StepMeasurer times only sparse-quant sites faster: that is what gets written, nothing else
    assert {s["technique"] for s in b.report["sites"]} - {None} == {"sparse-quant"} and b.report["decision"]["written"]


def test_a_killed_worker_is_restarted_and_its_task_retried(local_ray, lenet, mnist, local_result):
    killed, before, seen_after = [], set(), set()

    class KillOnce(Progress):
        def start(self, total, what):
            self.what = what

        def advance(self, n=1):
            if self.what != "first-level candidates" or n == 0:
                return
            if not killed:
                # a worker of this search while it measures (leftover workers of earlier tests are idle);
                # every worker has 1-2 tasks queued here, so the kill loses at least one
                deadline = time.time() + 10
                while not (busy := worker_pids(b"ray::_Worker.measure")) and time.time() < deadline:
                    time.sleep(0.01)
                victim = min(busy)
                before.update(worker_pids())
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            else:
                seen_after.update(worker_pids())

    r = search(lenet, mnist, Cluster(), progress=KillOnce())
    assert figures(r) == figures(local_result)
    # its lost tasks were retried on a new process that took its place
    assert killed and killed[0] not in seen_after and seen_after - before


def test_ctrl_c_keeps_the_cache_and_resume_continues(local_ray, lenet, mnist, local_result, tmp_path):
    cache = tmp_path / "o.onnx.search.json"

    class CtrlC(Progress):
        n = 0

        def start(self, total, what):
            self.what = what

        def advance(self, n=1):
            if self.what == "first-level candidates":
                self.n += 1
                if self.n == 7:
                    raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(lenet, mnist, Cluster(), cache_path=cache, progress=CtrlC())
    kept = json.loads(cache.read_text())["measured"]
    assert len(kept) >= 6  # every candidate finished before the interrupt (the 7th raised in its callback)
    deadline = time.time() + 30
    while worker_pids() and time.time() < deadline:  # the interrupted search's workers are stopped
        time.sleep(0.5)
    assert not worker_pids()

    notes = []

    class Notes(Progress):
        def note(self, text):
            notes.append(text)

    r = search(lenet, mnist, Cluster(), cache_path=cache, resume=True, progress=Notes())
    assert notes == [f"resumed {len(kept)} measured candidates from {cache}"]
    assert figures(r) == figures(local_result)


# ---- the CLI ------------------------------------------------------------------------------------
def cli_run(*args, hide_ray=False, timeout=300):
    """The installed CLI in a fresh interpreter (-P: not the source tree); hide_ray: as if Ray were not installed."""
    code = ("import sys\n" + ("sys.modules['ray'] = None\n" if hide_ray else "")
            + "from onnxzero.cli.main import cli\ncli(sys.argv[1:], prog_name='onnxzero')\n")
    return subprocess.run([sys.executable, "-P", "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, mnist):
    d = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(d, inputs=mnist.inputs[:200], labels=mnist.labels[:200])
    return d


def test_cli_connects_to_a_running_cluster_and_matches_the_local_search(local_ray, lenet, small_data, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli_run("optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs", "--techniques", "early-exit,sparse-quant",
                "--data", small_data, "-o", out, "--report", rep, "--ray", local_ray)
    assert r.returncode == 0, r.stderr
    ds = load_dataset(small_data)
    local = optimize(lenet, ds.inputs, ds.labels, SearchOptions(eps=3.0, objective="macs", techniques=("early-exit", "sparse-quant")))
    got = json.loads(rep.read_text())
    for k in ("validation_loss", "calibration_loss", "mac_reduction", "sites", "met_eps"):
        assert got[k] == json.loads(json.dumps(local.report[k])), k
    assert (got["optimized"]["accuracy"], got["optimized"]["macs"]) == (local.report["optimized"]["accuracy"],
                                                                        local.report["optimized"]["macs"])
    assert out.exists() and not (tmp_path / "o.onnx.search.json").exists()


def test_cli_sigint_keeps_the_cache_and_resume_continues(local_ray, small_data, tmp_path):
    """Ctrl-C on the driver, for real: SIGINT to the CLI once its cache holds the first candidates."""
    out, cache = tmp_path / "o.onnx", tmp_path / "o.onnx.search.json"
    args = ["optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs", "--techniques", "early-exit,sparse-quant,lazy",
            "--data", small_data, "-o", out, "--ray", local_ray]
    code = "import sys\nfrom onnxzero.cli.main import cli\ncli(sys.argv[1:], prog_name='onnxzero')\n"
    p = subprocess.Popen([sys.executable, "-P", "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not cache.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()  # still searching: 31 candidates, the cache is written every 10
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and stderr.strip() == "onnxzero: interrupted", stderr
    assert "what was measured is kept in" in " ".join(stdout.split()) and not out.exists()
    kept = len(json.loads(cache.read_text())["measured"])
    assert 10 <= kept < 31
    r = cli_run(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"onnxzero: resumed {kept} measured candidates from {cache}" in r.stderr.splitlines()
    assert out.exists() and not cache.exists()


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "onnxzero: error: --ray: cannot reach a Ray cluster at 127.0.0.1:1 (Connection refused); "
                    "start one with `ray start --head` or give its address"),
    ("nowhere", "onnxzero: error: --ray address 'nowhere', expected auto, HOST:PORT or ray://HOST:PORT"),
])
def test_cli_unreachable_address_is_one_line_and_writes_nothing(tmp_path, address, message):
    r = cli_run("optimize", "zoo:lenet5", "--eps", "3", "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json",
                "--ray", address)
    assert r.returncode == 1 and r.stderr.strip() == message and "Traceback" not in r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_without_ray_installed_names_the_extra(tmp_path, small_data):
    r = cli_run("optimize", "zoo:lenet5", "--eps", "3", "-o", tmp_path / "o.onnx", "--ray", hide_ray=True)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == "onnxzero: error: --ray needs Ray, which is not installed: pip install onnxzero[ray]"
    assert list(tmp_path.iterdir()) == []
    # without --ray, Ray is never imported: the search runs as before
    r = cli_run("optimize", "zoo:lenet5", "--eps", "3", "--objective", "macs", "--techniques", "early-exit",
                "--data", small_data, "-o", tmp_path / "o.onnx", hide_ray=True)
    assert r.returncode == 0, r.stderr


def test_more_workers_than_the_cluster_has_cpus_is_one_line(local_ray, tmp_path):
    """An actor Ray cannot place would hold its candidates forever: refused before any work."""
    r = cli_run("optimize", "zoo:lenet5", "--eps", "3", "-o", tmp_path / "o.onnx", "--ray", local_ray, "--ray-workers", "3")
    assert r.returncode == 1 and r.stderr.strip() == (
        "onnxzero: error: --ray-workers is 3, but the Ray cluster has room for 2 (one CPU each); expected at most 2")
    assert list(tmp_path.iterdir()) == []


def test_ray_workers_needs_ray(tmp_path):
    r = CliRunner().invoke(cli, ["optimize", "zoo:lenet5", "--eps", "3", "-o", str(tmp_path / "o.onnx"), "--ray-workers", "2"])
    assert r.exit_code == 1 and r.stderr.strip() == "onnxzero: error: --ray-workers needs --ray"
    assert list(tmp_path.iterdir()) == []
