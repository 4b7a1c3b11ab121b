"""Latency of the registered pipeline on this machine: per scan in-process (what
``covidct predict`` does), batched throughput, what ``predict --adapt-batchnorm`` adds to a
scored batch (BatchNorm re-estimation on the classifier inputs it kept, and the classifier
again), and per request through ``mlflow models serve``.

    python benchmarks/inference_latency.py --model models:/covidct@champion --n 30

Run from the repository root after ``dvc repro`` (it reads the test split's raw scans).
Prints medians and writes them to ``reports/benchmarks/inference_latency.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import torch

from covidct.paths import COVID_CT_SPLIT as SPLIT
from covidct.paths import raw
from covidct.predict import load_pipeline
from covidct.runtime import configure_threads
from covidct.tracking import tracking_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, scans: list[tuple[str, bytes]]) -> float:
    body = json.dumps(
        {
            "dataframe_split": {
                "columns": ["image", "name"],
                "data": [[base64.b64encode(b).decode(), n] for n, b in scans],
            }
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    assert not any(row["error"] for row in answer["predictions"]), answer
    return time.perf_counter() - started


def served_latency(model: str, scans: list[tuple[str, bytes]]) -> dict[str, float]:
    port = _free_port()
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
    }
    command = [
        "mlflow",
        "models",
        "serve",
        "-m",
        model,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    started = time.perf_counter()
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError("mlflow models serve did not start") from None
                time.sleep(0.25)
        startup = time.perf_counter() - started
        _post(port, scans[:1])  # warm-up
        single = [_post(port, [scan]) for scan in scans]
        batch = [_post(port, scans[i : i + 16]) / len(scans[i : i + 16]) for i in range(0, len(scans), 16)]
        return {
            "server_startup_s": startup,
            "served_ms_per_request_1_scan": 1000 * statistics.median(single),
            "served_ms_per_scan_batch_16": 1000 * statistics.median(batch),
        }
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/covidct@champion")
    parser.add_argument("--n", type=int, default=30, help="test scans timed one by one")
    parser.add_argument("--no-serve", action="store_true", help="skip the REST server")
    args = parser.parse_args()
    root = Path.cwd()
    mlflow.set_tracking_uri(tracking_uri(root))
    threads = configure_threads()
    table = pd.read_csv(root / SPLIT).query("split == 'test'")
    scans = [(p, (root / raw("covid-ct") / p).read_bytes()) for p in table["relpath"]]

    started = time.perf_counter()
    pipeline = load_pipeline(args.model)
    results: dict[str, float] = {
        "model_load_s": time.perf_counter() - started,
        "threads": threads,
        "cuda": torch.cuda.is_available(),
    }
    pipeline.predict_encoded(*zip(*scans[:2], strict=True))  # warm-up
    single = []
    for name, blob in scans[: args.n]:
        t0 = time.perf_counter()
        pipeline.predict_encoded([name], [blob])
        single.append(time.perf_counter() - t0)
    results["in_process_ms_per_scan_1_at_a_time"] = 1000 * statistics.median(single)
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(0, len(scans), 64):
            pipeline.predict_encoded(*zip(*scans[i : i + 64], strict=True))
        rounds.append(len(scans) / (time.perf_counter() - t0))
    results["in_process_scans_per_s_batch_64"] = statistics.median(rounds)
    predictions = [
        p for i in range(0, len(scans), 64) for p in pipeline.predict_encoded(*zip(*scans[i : i + 64], strict=True))
    ]
    rounds = []
    for _ in range(3):  # last: it changes the pipeline's statistics
        t0 = time.perf_counter()
        pipeline.adapt_batchnorm(predictions)
        rounds.append(len(scans) / (time.perf_counter() - t0))
    results["adapt_batchnorm_scans_per_s"] = statistics.median(rounds)
    if not args.no_serve:
        results |= served_latency(args.model, scans[: args.n])
    out = root / "reports/benchmarks/inference_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:40s} {value:.2f}" if isinstance(value, float) else f"{key:40s} {value}")


if __name__ == "__main__":
    main()
