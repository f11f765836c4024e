"""``cfcam explain`` throughput with 1 vs N processes (torchrun), same inputs, same model.

    python -m bench.scaling                                   # CPU: 64 images at 224, resnet18, 1 vs 2
    python -m bench.scaling --procs 1,2,4,8 --device cuda --images 2048 --batch-size 64   # one GPU node

Writes ``--images`` PNGs (the photos bundled with scikit-image / scikit-learn, resized to --size, cycled,
mirrored on odd passes; ``--kind random`` for seeded noise) and a seeded ``--model`` state dict
(torch.manual_seed(0), torchvision) into a temporary folder, then runs, for each process count P,

    python -m torch.distributed.run --standalone --nproc-per-node P -m cfcam_gpu explain IMAGES \
        --out OUT_P --model resnet18 --weights W.pth --workers 0 --batch-size B --json --quiet

with OMP_NUM_THREADS=--threads in every process, --repeats times, the process counts interleaved. From
rank 0's JSON summary it takes images/s = images / seconds from the start of the explain loop (after the
model is loaded and the ranks met) to the end of the last rank's loop; it prints the best run and the
median of the runs per process count, the speed-ups against the first process count, and the wall time
of the whole command (Python start-up and model loading included). Every run's manifest is checked to
hold --images ok rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int, size: int, kind: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "real":
        from cfcam_gpu.app.data import bundled_images

        photos = [np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                  for _, image in bundled_images()]
    rng = np.random.default_rng(0)
    for i in range(n):
        if kind == "real":
            image = photos[i % len(photos)]
            if (i // len(photos)) % 2:
                image = image[:, ::-1]
        else:
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"img{i:05d}.png")


def write_weights(model: str, path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(model, weights=None).state_dict(), path)


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "host": platform.node(), "os": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def command(procs: int, images: Path, out: Path, weights: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "-m", "cfcam_gpu", "explain", str(images), "--out", str(out), "--model", args.model,
            "--weights", str(weights), "--device", args.device, "--workers", str(args.workers),
            "--batch-size", str(args.batch_size), "--method", args.method, "--json", "--quiet"]


def run_once(procs: int, images: Path, out: Path, weights: Path, args: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    started = time.perf_counter()
    proc = subprocess.run(command(procs, images, out, weights, args), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"bench.scaling: {procs} process(es) failed with exit status {proc.returncode}:\n"
                 f"{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    if len(rows) != args.images or any(row["status"] != "ok" for row in rows):
        sys.exit(f"bench.scaling: {procs} process(es): expected {args.images} ok rows in the manifest")
    return {"images_per_s": args.images / summary["seconds"], "seconds": summary["seconds"], "wall_s": wall,
            "world_size": summary.get("world_size")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", default="1,2", help="process counts, comma separated (default 1,2)")
    parser.add_argument("--images", type=int, default=64, help="number of input images (default 64)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--kind", choices=("real", "random"), default="real")
    parser.add_argument("--model", default="resnet18", help="torchvision model name (default resnet18)")
    parser.add_argument("--method", choices=("cfcam", "gradcam"), default="cfcam")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda: cuda:LOCAL_RANK each")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per process count (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    procs = [int(p) for p in args.procs.split(",")]

    with tempfile.TemporaryDirectory(prefix="cfcam-scaling-") as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", args.images, args.size, args.kind)
        write_weights(args.model, tmp / "weights.pth")
        runs: dict[int, list[dict]] = {p: [] for p in procs}
        for repeat in range(args.repeats):
            for p in procs:
                result = run_once(p, tmp / "images", tmp / f"out{p}", tmp / "weights.pth", args)
                runs[p].append(result)
                print(f"  repeat {repeat + 1}/{args.repeats}, {p} process(es): "
                      f"{result['images_per_s']:.2f} images/s, wall {result['wall_s']:.1f} s",
                      file=sys.stderr)
        example = command(procs[-1], Path("IMAGES"), Path("OUT"), Path("W.pth"), args)

    best = {p: max(runs[p], key=lambda r: r["images_per_s"]) for p in procs}
    median = {p: float(np.median([r["images_per_s"] for r in runs[p]])) for p in procs}
    base, base_median = best[procs[0]]["images_per_s"], median[procs[0]]
    info = machine()
    print(f"machine: {info['cpu']}, {info['cpu_count']} logical CPU(s), {info['os']}; torch {info['torch']}"
          + (f"; {info['cuda_devices']} x {info['cuda']}" if info["cuda"] else "")
          + (f"; load average {info['loadavg']}" if "loadavg" in info else ""))
    print(f"inputs: {args.images} {args.kind} PNGs at {args.size}x{args.size}, {args.model} "
          f"(seeded weights), "
          f"{args.method}, batch {args.batch_size}, {args.threads} thread(s) and {args.workers} loader "
          f"worker(s) per process, device {args.device}, {args.repeats} runs each")
    print(f"command: OMP_NUM_THREADS={args.threads} {' '.join(example)}")
    print(f"{'processes':>9}  {'images/s':>9}  {'speed-up':>8}  {'loop s':>7}  {'wall s':>7}  "
          f"{'median images/s':>15}  {'speed-up':>8}   (best run, then median of the runs)")
    for p in procs:
        r = best[p]
        print(f"{p:>9}  {r['images_per_s']:>9.2f}  {r['images_per_s'] / base:>7.2f}x  {r['seconds']:>7.2f}  "
              f"{r['wall_s']:>7.1f}  {median[p]:>15.2f}  {median[p] / base_median:>7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "args": vars(args), "command": example, "runs": runs,
             "best": best, "speedup": {p: best[p]["images_per_s"] / base for p in procs},
             "median_images_per_s": median,
             "median_speedup": {p: median[p] / base_median for p in procs}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
