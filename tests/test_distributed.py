"""Multi-process training: two processes of 4 CPU devices each (jax.distributed, gloo collectives) train
as one process with 8 devices does; each reads only its slice of every batch; only process 0 writes
files. The runs are train.py under the driver of tests/test_reliability.py, whose uninterrupted
8-device run is the reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from apjax.data.pipeline import TrainBatches, data_mesh
from apjax.trainer.config import load_data
from tests.test_reliability import (  # noqa: F401  (reference, reliability_env: session fixtures)
    TIMEOUT,
    driver_command,
    metric_rows,
    read_events,
    reference,
    rel_config,
    reliability_env,
    restore_params,
    subprocess_env,
    write_config_file,
)

# On the worker of tests/test_reliability.py, whose session fixtures (reference, reliability_env) it uses.
pytestmark = pytest.mark.xdist_group("reliability")

CHECKPOINT_DIR = "checkpoints"
OWN_FILES = ("config.json", "metrics.jsonl", "final_metrics.json")
TENSORBOARD_DIR = "tensorboard"  # process 0's event files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(cmds: list[list[str]], env: dict, logs: list) -> list[int]:
    """Starts every command at once; if one fails, stops the others (they would wait on it)."""
    procs = [
        subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        for cmd, out in zip(cmds, logs, strict=True)
    ]
    deadline = time.monotonic() + TIMEOUT
    try:
        while None in (codes := [p.poll() for p in procs]):
            if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def test_two_processes_train_like_one_process_with_eight_devices(
    tmp_path,
    reliability_env,  # noqa: F811
    reference,  # noqa: F811
):
    _, ref_dir = reference
    env = reliability_env
    # A fresh data folder: both processes find the dataset missing and must not prepare it at once.
    data = tmp_path / "data"
    config_file = write_config_file(tmp_path / "rel_config_fresh.py", data)
    workdir = tmp_path / "run"
    coordinator = f"127.0.0.1:{_free_port()}"
    events = [tmp_path / f"process{i}.events.jsonl" for i in range(2)]
    cmds = [
        driver_command(
            env,
            workdir,
            events[i],
            config_file=config_file,
            coordinator=coordinator,
            num_processes=2,
            process_id=i,
            record_rows=True,
            audit=str(workdir),
        )
        for i in range(2)
    ]
    log_paths = [tmp_path / f"process{i}.log" for i in range(2)]
    with open(log_paths[0], "w") as out0, open(log_paths[1], "w") as out1:
        codes = _run_processes(cmds, subprocess_env(env, devices=4), [out0, out1])
    logs = [p.read_text() for p in log_paths]
    assert codes == [0, 0], (codes, logs[0][-3000:], logs[1][-3000:])
    ev = [read_events(p) for p in events]

    # The same training as one process with 8 devices (the cross-process all-reduce may sum in
    # another order: equal up to float32 rounding).
    a, meta_a = restore_params(env, ref_dir)
    b, meta_b = restore_params(env, workdir, config=rel_config(data))
    assert meta_a["step"] == meta_b["step"] == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    rows_a, rows_b = metric_rows(ref_dir), metric_rows(workdir)
    assert [sorted(r) for r in rows_a] == [sorted(r) for r in rows_b]  # one row per log step, no duplicate
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for k in ra:
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-6, err_msg=k)
    final_a = json.loads((ref_dir / "final_metrics.json").read_text())["val"]
    final_b = json.loads((workdir / "final_metrics.json").read_text())["val"]
    for k in final_a:
        np.testing.assert_allclose(final_b[k], final_a[k], rtol=1e-4, atol=1e-6, err_msg=k)

    # Each process gathered only its half of every global batch (the batch's images sorted, then split):
    # train steps 0..5, and the 16 val images in order at each of the 4 evaluations.
    c = rel_config(data)
    cache = load_data(c, splits=("train",))["train"]
    batches = TrainBatches(cache, c.batch_size, seed=c.seed, mesh=data_mesh())
    expected = {
        p: [sorted(batches.indices(s).tolist())[8 * p : 8 * (p + 1)] for s in range(6)] for p in range(2)
    }
    for p in range(2):
        train_rows = [e["rows"] for e in ev[p] if e["event"] == "rows" and e["split"] == "train"]
        assert train_rows == expected[p], p
        val_rows = [e["rows"] for e in ev[p] if e["event"] == "rows" and e["split"] == "val"]
        if p == 0:  # and once, the first 4 val images of the TensorBoard maps picture (process 0's)
            val_rows.remove([0, 1, 2, 3])
        assert val_rows == [list(range(8 * p, 8 * (p + 1)))] * 4, p

    # Only process 0 writes the run's files (TensorBoard's too); process 1 writes only its share of the
    # (collective) Orbax checkpoints.
    def written(p):
        return {str(Path(e["path"]).relative_to(workdir)) for e in ev[p] if e["event"] == "write"}

    outside = [f for f in written(1) if not f.startswith(CHECKPOINT_DIR + "/")]
    assert outside == [], outside
    own = {f for f in written(0) if f.split("/")[0] not in (".", CHECKPOINT_DIR, TENSORBOARD_DIR)}
    assert any(f.startswith(f"{TENSORBOARD_DIR}/events.out.tfevents.") for f in written(0))
    assert {f for f in own if not f.startswith(".")} == set(OWN_FILES), own
    assert all(any(f.startswith(f".{name}.tmp") for name in OWN_FILES) for f in own if f.startswith("."))
    assert sorted(p.name for p in workdir.iterdir()) == sorted((CHECKPOINT_DIR, TENSORBOARD_DIR, *OWN_FILES))
    assert "| split |" in logs[0] and "| split |" not in logs[1]
    print(f"process 1 wrote {len(written(1))} paths, all under {CHECKPOINT_DIR}/")


# One process of a two-process run: a tiny split in a HostCache, its device-resident copy on the global
# 'data' mesh, and the batches of a few steps compared, shard by shard, with the host-fed ones.
RESIDENT_SCRIPT = r"""
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from apjax.data.cache import HostCache
from apjax.data.pipeline import DeviceCache, TrainBatches, data_mesh

rng = np.random.default_rng(0)  # the same split in both processes, as a shared data_dir gives
n = 48
cache = HostCache(
    images=rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8),
    sizes=rng.integers(8, 13, (n, 2)).astype(np.int32),
    extents=rng.integers(8, 13, (n, 2)).astype(np.int32),
    labels=rng.integers(0, 2, (n, 5)).astype(np.uint8),
    masks=None,
    image_ids=[str(i) for i in range(n)],
)
mesh = data_mesh()
assert mesh.devices.size == 8 and jax.process_count() == 2
host_fed = TrainBatches(cache, 16, seed=3, mesh=mesh)
resident = TrainBatches(cache, 16, seed=3, mesh=mesh, resident=DeviceCache(cache, mesh))
for step in (0, 2, 3):  # 3 steps per epoch
    a, b = host_fed.batch(step), resident.batch(step)
    assert set(a) == set(b)
    for key in a:
        sa = sorted(a[key].addressable_shards, key=lambda s: s.device.id)
        sb = sorted(b[key].addressable_shards, key=lambda s: s.device.id)
        assert [s.index for s in sa] == [s.index for s in sb] and len(sa) == 4
        for x, y in zip(sa, sb):
            np.testing.assert_array_equal(np.asarray(x.data), np.asarray(y.data))
print("resident batches equal", jax.process_index())
"""


def test_device_resident_batches_equal_the_host_fed_ones_in_two_processes(tmp_path):
    """config.data.on_device in a two-process run: each process copies the split to its own devices and
    gathers its half of each batch there, the same rows as it would read and send from the host."""
    script = tmp_path / "resident.py"
    script.write_text(RESIDENT_SCRIPT)
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    cmds = [[sys.executable, str(script), coordinator, str(i)] for i in range(2)]
    log_paths = [tmp_path / f"process{i}.log" for i in range(2)]
    with open(log_paths[0], "w") as out0, open(log_paths[1], "w") as out1:
        codes = _run_processes(cmds, env, [out0, out1])
    logs = [p.read_text() for p in log_paths]
    assert codes == [0, 0], (logs[0][-3000:], logs[1][-3000:])
    for i in range(2):
        assert f"resident batches equal {i}" in logs[i]
