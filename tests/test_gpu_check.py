"""bench/gpu_check.py's plumbing, which runs for real only on a GPU machine: how it reads each step's JSON (also
from a step stopped at its time limit), how it judges the targets, and how it brings the benchmarks' peers to a
machine without network (from wheels)."""
import os
import subprocess
import sys
import zipfile

from bench import gpu_check

PY = sys.executable


def test_reads_a_steps_json_on_one_line_or_indented_after_other_output(tmp_path):
    one_line = gpu_check.run_step("s", [PY, "-c", "print('# warming up'); print('{\"a\": 1}')"], 60)
    indented = gpu_check.run_step("s", [PY, "-c", "import json; print('text {'); "
                                              "print(json.dumps({'a': {'b': [1, 2]}}, indent=1))"], 60)
    no_json = gpu_check.run_step("s", [PY, "-c", "print('{not json')"], 60)
    assert one_line["ok"] and one_line["result"] == {"a": 1}
    assert indented["ok"] and indented["result"] == {"a": {"b": [1, 2]}}
    assert no_json["ok"] and "result" not in no_json and "{not json" in no_json["output_tail"]


def test_a_step_stopped_at_its_limit_keeps_what_it_wrote(tmp_path):
    partial = tmp_path / "partial.json"  # as bench/ops.py --out leaves it after its first op
    partial.write_text('{"results": {"contrastive/cuda": 1}}')
    record = gpu_check.run_step("ops", [PY, "-c", "import time; time.sleep(600)"], 2, partial_json=str(partial))
    assert not record["ok"] and record["timed_out"]
    assert record["result"] == {"results": {"contrastive/cuda": 1}} and record["result_partial"]


def test_each_target_is_judged_from_its_own_measurement():
    report = {"results": {"contrastive/cuda": {"compiled": {"time_ms": 11.9, "peak_extra_mb": 122.5}},
                          "moco/cuda": {"compiled": {"time_ms": 0.51}},
                          "kmeans/cuda": {"compiled": {"ms_per_iteration": 5.0}},
                          "sinkhorn/cuda": {"compiled": {"time_ms": 0.2}}},
              "ratios": {"kmeans/cuda": {"time_vs_fast_pytorch_kmeans": None},
                         "sinkhorn/cuda": {"time_vs_swav_formula": 0.3}}}
    got = {(v["op"], v["target"].split(" (")[0][:12]): (v["measured"], v["met"])
           for v in gpu_check.verdicts(report, "cuda")}
    assert len(got) == sum(map(len, gpu_check.perf_model.TARGETS.values()))
    assert got["contrastive", "2N = 65536, "] == (11.9, True)
    assert got["contrastive", "its peak ext"] == (122.5, False)  # 128 MB is 122.07 MiB
    assert got["moco", "4096 queries"] == (0.51, False)
    assert got["kmeans", "1.28M x 128 "] == (5.0, True)
    assert got["kmeans", "time vs fast"] == (None, None)  # the peer was not measured: no verdict
    assert got["sinkhorn", "7936 x 3000,"] == (0.2, True)
    assert got["sinkhorn", "time vs SwAV"] == (0.3, True)
    assert all(v["met"] is None for v in gpu_check.verdicts({}, "cuda"))


def _wheel(folder, name, version, body):
    """A minimal pure-Python wheel of a one-module package."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": body,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_peers_come_from_wheels_when_not_installed(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "ssl_peer_here", "0.3", "VALUE = 42\n")
    monkeypatch.setattr(gpu_check, "peer_packages",
                        lambda: [("ssl-peer-here", "0.3"), ("ssl-peer-absent", "1.0"), ("pytest", "0")])
    env, used = gpu_check.install_peers(str(wheels), str(tmp_path / "site"))
    assert used["ssl-peer-here"] == "0.3 (wheel)"
    assert used["ssl-peer-absent"].startswith("missing: not installed and no ssl_peer_absent-1.0 wheel")
    assert used["pytest"].endswith("(installed)")  # an installed peer is used as it is, whatever the pin
    out = subprocess.run([PY, "-c", "import ssl_peer_here; print(ssl_peer_here.VALUE)"],
                         env={**os.environ, **env}, capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr
    none_env, none_used = gpu_check.install_peers(str(tmp_path / "empty"), str(tmp_path / "site2"))
    assert none_env == {} and none_used["ssl-peer-here"].startswith("missing")
