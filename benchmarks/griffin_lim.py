"""Griffin-Lim over a batch of demo-length log-mels: the whole batch at once vs a few rows at a time, in one run.

Why: the audio demo turns every sampled clip into a wave with Griffin-Lim before CLAP or the judge hears it, and
its evaluation passes a model's 512 clips (64 captions x 8) in one call. A profile of that stage on a 2-core CPU put
two thirds of its time in Griffin-Lim. The loop is elementwise passes over complex spectra plus an STFT and an
inverse STFT per iteration; a whole batch's spectra do not fit in cache, a few rows do. The waves must not change
(each row's arithmetic is its own), which the script checks while it times.

    python benchmarks/griffin_lim.py [--clips 128] [--iters 16] [--rows 0 auto 1 8 0 auto] [--loops planar]
        # rows 0: the whole batch at once (the earlier code path); auto: mmpref's default on a CPU
        # loops: complex (the plain loop on complex tensors, the earlier code) and/or planar (mmpref's loop: real and
        # imaginary parts apart); every rows setting runs with every loop, in turn
        # writes benchmarks/results/griffin_lim_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, timed, versions  # noqa: E402

from mmpref.io import write_json_atomic  # noqa: E402


def main() -> None:
    import torch

    from mmpref.audio import MelConfig
    from mmpref.audio.griffin_lim import CHUNK_ELEMENTS, griffin_lim
    from mmpref.demo.pipeline import GRIFFIN_LIM_ITERS
    from mmpref.demo.stages import set_threads

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=128)
    p.add_argument("--frames", type=int, default=256, help="log-mel frames per clip (the demo's 2.56 s: 256)")
    p.add_argument("--iters", type=int, default=GRIFFIN_LIM_ITERS)
    p.add_argument("--rows", nargs="+", default=["0", "auto", "1", "8", "0", "auto"])
    p.add_argument("--loops", nargs="+", choices=["complex", "planar"], default=["planar"])
    p.add_argument("--out", default=str(HERE / "results" / "griffin_lim_cpu.json"))
    args = p.parse_args()
    import importlib

    module = importlib.import_module("mmpref.audio.griffin_lim")  # the package exports the function of that name
    loops = {"planar": module._iterate, "complex": module._iterate_complex}

    threads = set_threads()
    cfg = MelConfig()
    logmel = torch.randn(args.clips, args.frames, cfg.n_mels, generator=torch.Generator().manual_seed(0)) - 5.0

    def invert(rows: str, loop: str) -> torch.Tensor:
        module._iterate = loops[loop]
        chunk = args.clips if rows == "0" else None if rows == "auto" else int(rows)
        gens = [torch.Generator().manual_seed(0) for _ in range(args.clips)]  # as GriffinLimVocoder seeds them
        return griffin_lim(logmel, cfg, args.iters, gens, rows_per_chunk=chunk)

    for loop in args.loops:
        invert("auto", loop)  # warm-up: first-call allocations and FFT plans
    results, reference = [], None
    for rows in args.rows:
        for loop in args.loops:
            wave, wall, cpu = timed(invert, rows, loop)
            reference = wave if reference is None else reference
            results.append({"loop": loop, "rows_per_chunk": "whole batch" if rows == "0" else rows, "seconds": wall,
                            "cpu_seconds": cpu, "clips_per_s": args.clips / wall,
                            "bitwise_equal_to_first": bool(torch.equal(wave, reference))})
    base = results[0]["seconds"]
    for r in results:
        r["speedup_vs_first"] = base / r["seconds"]
    auto_rows = max(1, CHUNK_ELEMENTS // ((cfg.n_fft // 2 + 1) * args.frames))
    result = {"clips": args.clips, "frames": args.frames, "iters": args.iters, "auto_rows": auto_rows,
              "torch_threads": threads, "rows": results, "machine": machine_info(), "versions": versions()}
    write_json_atomic(Path(args.out), result)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
