"""The command line, as a user runs it: `epdserve demo`, `generate`, `model tiny`, `serve`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.models.spec import load_spec
from epdserve.models.tiny import shipped_vqa_checkpoint

pytestmark = pytest.mark.e2e


def _epdserve(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epdserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_demo_json_exits_zero_and_answers_its_question(tmp_path):
    done = _epdserve("demo", "--json", env={"EPDSERVE_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["exit_codes"] == {"router": 0, "encode": 0, "prefill": 0, "decode": 0}
    assert report["usage"]["image_tokens"] > 0
    for key in ("encode.encode_ms", "prefill.prefill_ms", "kv_handoff_ms", "ttft_ms", "tpot_ms"):
        assert key in report["timings_ms"]
    if shipped_vqa_checkpoint() is not None:  # the trained model answers the generated question
        assert report["finish_reason"] == "stop" and report["text"].strip() == report["expected"], report["text"]


def test_demo_human_output_streams_and_reports(tmp_path):
    done = _epdserve("demo", env={"EPDSERVE_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    for text in ("picture:", "answer:", "expected answer:", "TTFT", "KV hand-off", "decode: per token",
                 "router exit 0"):
        assert text in done.stdout


def test_generate_json_and_model_tiny(tmp_path):
    model = tmp_path / "tiny"
    built = _epdserve("model", "tiny", "--out", str(model), "--backbone", "qwen2", "--vision", "siglip")
    assert built.returncode == 0, built.stderr
    image = tmp_path / "pic.png"
    from PIL import Image

    Image.new("RGB", (30, 20), (10, 200, 30)).save(image)
    with LocalCluster(ClusterConfig(model_dir=model, device="cpu")) as cluster:
        done = _epdserve("generate", "--router", cluster.router_address, "--image", str(image), "--json",
                         "--temperature", "0", "--max-tokens", "5", "--ignore-eos", "What colour?")
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert len(out["token_ids"]) == 5 and isinstance(out["text"], str)
        bad = _epdserve("generate", "--router", cluster.router_address, "--top-p", "2", "hi")
        assert bad.returncode == 1 and "top_p must be in (0, 1]" in bad.stderr


def test_model_tiny_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").write_text("keep me")
    done = _epdserve("model", "tiny", "--out", str(tmp_path))
    assert done.returncode == 1 and "not empty" in done.stderr


def test_serve_with_an_unknown_model_directory_fails_clearly(tmp_path):
    done = _epdserve("serve", "prefill", "--model", str(tmp_path / "missing"), "--redis-url", "redis://127.0.0.1:1/0",
                     timeout=120)
    assert done.returncode != 0
    assert "does not exist" in done.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for stat in __import__("glob").glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


def test_up_serves_until_interrupted_and_leaves_nothing(tmp_path):
    """`epdserve up` prints the router address, serves SDK requests (PIL images too), and on Ctrl-C
    stops every child (redis included) and exits 0. Its output is read all along (a full pipe
    would block it) and shown when the test fails."""
    import queue
    import re
    import signal
    import threading
    import time

    from PIL import Image

    from epdserve.sdk import Client

    up = subprocess.Popen([sys.executable, "-m", "epdserve.cli", "up", "--port", "0"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, "EPDSERVE_CACHE_DIR": str(tmp_path)})
    lines: queue.Queue = queue.Queue()
    output: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in up.stdout] and None, daemon=True).start()

    def next_line(timeout: float) -> str | None:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            return None
        output.append(line)
        return line

    try:
        deadline, address = time.monotonic() + 240, None
        while address is None and time.monotonic() < deadline:
            line = next_line(1.0)
            assert line is not None or up.poll() is None, "epdserve up exited early"
            match = re.search(r"router (\S+:\d+)", line or "")
            address = match.group(1) if match else None
        assert address, "no router address printed"
        children = _children(up.pid)
        assert len(children) == 5  # redis + four services
        with Client(address, timeout_s=60) as client:
            result = client.generate("PIL?", images=[Image.new("RGB", (12, 12), (9, 9, 9))], max_tokens=3)
        default = shipped_vqa_checkpoint()  # the shipped VQA model (9 image tokens), else the tiny one (16)
        assert result.usage.image_tokens == (load_spec(default).tokens_per_image if default else 16)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        while next_line(1.0) is not None:
            pass
        assert "router exit 0" in "".join(output)
        time.sleep(0.2)
        assert [pid for pid in children if os.path.exists(f"/proc/{pid}")] == []
    except BaseException:
        while next_line(0.5) is not None:
            pass
        print("epdserve up printed:\n" + "".join(output)[-6000:])
        raise
    finally:
        if up.poll() is None:
            up.kill()


def test_cache_cli_stats_inspect_flush(tiny_checkpoint):
    import redis

    from epdserve.sdk import Client

    with LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cpu")) as cluster:
        with Client(cluster.router_address) as client:
            from PIL import Image

            client.generate("hi", images=[Image.new("RGB", (8, 8), (1, 2, 3))], max_tokens=2)
        url = ["--redis-url", cluster.redis_url]
        stats = json.loads(_epdserve("cache", "stats", "--json", *url).stdout)
        assert stats["index_entries"]["img"] == 1
        owners = {o["owner"].split("-")[0]: o for o in stats["owners"]}
        assert set(owners) == {"encode", "prefill", "decode"} and all(o["alive"] for o in owners.values())
        assert owners["encode"]["entries"] == {"img": 1} and owners["encode"]["used_bytes"]["host"] > 0
        key = next(redis.Redis.from_url(cluster.redis_url).scan_iter(match="*:e:img:*")).decode().split(":e:", 1)[1]
        entry = json.loads(_epdserve("cache", "inspect", key, "--json", *url).stdout)
        assert entry["owner_alive"] and entry["shape"] == [16, 64] and entry["ttl_s"] > 0
        missing = _epdserve("cache", "inspect", "img:nothere", *url)
        assert missing.returncode == 1 and "not in the index" in missing.stderr
        assert _epdserve("cache", "flush", *url).returncode == 2  # needs --yes
        assert json.loads(_epdserve("cache", "flush", "--yes", "--json", *url).stdout)["removed"] >= 1
        assert json.loads(_epdserve("cache", "stats", "--json", *url).stdout)["index_entries"] == {}


def test_cache_cli_reports_an_unreachable_redis():
    done = _epdserve("cache", "stats", "--redis-url", "redis://127.0.0.1:1/0")
    assert done.returncode == 1 and "cannot reach Redis" in done.stderr


def test_bench_cache_reports_every_number():
    done = _epdserve("bench", "cache", "--json", "--repeats", "1", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    for key in ("memcpy_gbps", "shm_gbps", "stream_gbps", "index_ops_per_s"):
        assert result[key] > 0, key


def test_a_killed_launcher_leaves_no_orphans(tmp_path):
    """SIGKILL the `epdserve up` process itself: every child (redis, four services) still goes, and
    the next launcher removes the directories it left (shared-memory pools, logs)."""
    import re
    import signal
    import time

    from epdserve.launcher import LAUNCHER_PID_FILE, _shm_root, remove_abandoned_cluster_dirs

    up = subprocess.Popen([sys.executable, "-m", "epdserve.cli", "up", "--port", "0"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, "EPDSERVE_CACHE_DIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"router (\S+:\d+)", up.stdout.readline()):
            assert up.poll() is None and time.monotonic() < deadline, "epdserve up did not come up"
        children = _children(up.pid)
        assert len(children) == 5
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=10)
        deadline = time.monotonic() + 30
        while [pid for pid in children if _running(pid)]:
            assert time.monotonic() < deadline, "children outlived their launcher"
            time.sleep(0.2)
        left = [path.parent for root in (_shm_root(), pathlib.Path(tempfile.gettempdir()))
                for path in root.glob(f"epdserve-cluster-*/{LAUNCHER_PID_FILE}") if path.read_text() == str(up.pid)]
        assert len(left) == 2                                   # its pool root and its log directory
        for root in {directory.parent for directory in left}:
            remove_abandoned_cluster_dirs(root)                  # what the next launcher's start does
        assert not any(directory.exists() for directory in left)
    finally:
        if up.poll() is None:
            up.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
