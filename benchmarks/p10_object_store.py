"""P10: `kdpipe extract` and `kdpipe score` of the same store to a local folder and to S3, in one run.

The S3 side is moto's server on 127.0.0.1 in a process of its own (so it does not share this process's GIL), reached
through s3fs as a real bucket would be: the ratio is kdpipe's own cost of object storage (a PUT per chunk, requests
for metadata, flags and the lock), on a server that answers in well under a millisecond. A real bucket adds its
network's latency and bandwidth on top; moto, a Python server, also takes cycles from the 2 cores kdpipe uses.

    python benchmarks/p10_object_store.py [--num-images 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from workload import DATASET, TEACHER, TEACHER_TAPS, Timer, setup_threads, teacher_checkpoint

BUCKET = "kdpipe-bench"
SERVER = """
import logging, time
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
time.sleep(3600)
"""


def s3_server() -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    return server, f"http://127.0.0.1:{int(server.stdout.readline())}"


def run(out: str, checkpoint: str, num_images: int) -> tuple[float, float]:
    """Seconds of extract, then of score, with the store at `out`."""
    from pipeline import ExtractConfig, ScoreConfig, extract, score

    config = ExtractConfig(
        out=out,
        teacher=TEACHER,
        checkpoint=checkpoint,
        dataset=DATASET,
        splits=("train",),
        layers=TEACHER_TAPS,
        max_samples=num_images,
        device="cpu",
    )
    with Timer() as extracting:
        extract(config)
    with Timer() as scoring:
        score(ScoreConfig(store=out, plot=False))
    return extracting.seconds, scoring.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=2000)
    args = parser.parse_args()
    setup_threads()
    server, endpoint = s3_server()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir(BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = teacher_checkpoint(Path(tmp))
            run(str(Path(tmp) / "warm"), checkpoint, 64)  # imports, data and first forward out of the timings
            local = run(str(Path(tmp) / "local"), checkpoint, args.num_images)
            remote = run(f"s3://{BUCKET}/p10", checkpoint, args.num_images)
            stored = s3fs.S3FileSystem().du(f"{BUCKET}/p10", total=True) / 2**20
    finally:
        server.kill()
        server.wait()
    print(f"{args.num_images} images, {len(TEACHER_TAPS)} taps of {TEACHER}, {stored:.0f} MiB stored")
    print(f"extract: local {local[0]:.1f} s, S3 (moto) {remote[0]:.1f} s ({remote[0] / local[0]:.2f}x)")
    print(f"score:   local {local[1]:.1f} s, S3 (moto) {remote[1]:.1f} s ({remote[1] / local[1]:.2f}x)")
    total_local, total_remote = sum(local), sum(remote)
    ratio = total_remote / total_local
    print(f"P10 extract + score on S3 / local: {ratio:.2f} ({total_remote:.1f} vs {total_local:.1f} s)")


if __name__ == "__main__":
    main()
