"""Performance model of the CUDA kernels at their target shapes, stated before any GPU measurement.

For each op: the floating-point work, the bytes that must cross the DRAM interface, the bytes
the blocks pull from L2 into shared memory, and the launches per call, from the kernels' own
tile sizes (read from csrc/kernels/*.cuh, so the model follows the code); the lower bound on
a device is max(work / peak rate, DRAM bytes / bandwidth), next to the op's target, and for the tiled
GEMM kernels also the time to stream their tiles from L2 (at an assumed L2 bandwidth). With
--ptxas it also compiles csrc/*_cuda.cu for sm_90 and reports each kernel's registers, shared
memory and spills as ptxas states them. bench/ops.py --device cuda prints the same bounds
beside its measured times.

    python bench/perf_model.py [--device h100|h200] [--ptxas] [--out model.json]
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "kernels")

# dense peak rates (no sparsity) and DRAM bandwidths from the vendor's data sheets; l2 is an assumed L2-to-SM
# bandwidth (not on the data sheets; microbenchmarks put an H100's between about 7 and 12 TB/s)
DEVICES = {
    "h100": dict(name="H100 SXM5", bf16=989e12, tf32=494.7e12, fp32=66.9e12, dram=3.35e12, sms=132, l2=10e12),
    "h200": dict(name="H200 SXM", bf16=989e12, tf32=494.7e12, fp32=66.9e12, dram=4.8e12, sms=132, l2=10e12),
}

# the targets the kernels are built to meet on an H100, as bench/gpu_check.py judges them from bench/ops.py's CUDA
# run: bench/ops.py's op -> [(what, its key in the compiled run's result or in the op's ratios, the limit)]
TARGETS = {
    "contrastive": [("2N = 65536, D = 128, bf16, forward + backward (ms)", "time_ms", 12.0),
                    ("its peak extra memory (MiB; 128 MB)", "peak_extra_mb", 128e6 / 2**20)],
    "moco": [("4096 queries x 65536 keys, bf16, forward + backward (ms)", "time_ms", 0.5)],
    "kmeans": [("1.28M x 128 -> 3000, TF32 (ms per iteration)", "ms_per_iteration", 6.0),
               ("time vs fast-pytorch-kmeans (at least 3x faster)", "time_vs_fast_pytorch_kmeans", 1 / 3)],
    "sinkhorn": [("7936 x 3000, 3 iterations (ms)", "time_ms", 0.3),
                 ("time vs SwAV's formula (at least 3x faster)", "time_vs_swav_formula", 1 / 3)],
}


def target_text(op):
    """An op's targets in words: "<what> <= <limit>; ..."."""
    return "; ".join(f"{what} <= {limit:.4g}" for what, _, limit in TARGETS[op])


def constexpr(header, name):
    """The value of `constexpr int <name> = <int>;` in csrc/kernels/<header>."""
    with open(os.path.join(KERNELS, header)) as f:
        match = re.search(rf"constexpr\s+(?:int|int64_t)\s+{name}\s*=\s*(\d+)\s*;", f.read())
    if match is None:
        raise SystemExit(f"error: {header} defines no constexpr {name}")
    return int(match.group(1))


def bound(flops, rate, dram_bytes, dev):
    t_compute, t_memory = flops / dev[rate], dram_bytes / dev["dram"]
    return {"compute_ms": round(t_compute * 1e3, 4), "dram_ms": round(t_memory * 1e3, 4),
            "lower_bound_ms": round(max(t_compute, t_memory) * 1e3, 4),
            "bound_by": "compute" if t_compute >= t_memory else "memory"}


def sinkhorn_model(dev, b=7936, k=3000, iters=3, score_bytes=4):
    """Column max (torch.amax), init, iters - 1 steps, finish; Q' in fp32, partials in float64."""
    max_blocks = 2 * dev["sms"]  # csrc/sinkhorn_cuda.cu: two row blocks per SM
    blocks = min(math.ceil(b / 16), max_blocks)
    q = b * k * 4
    partials = 2 * blocks * k * 8  # written by the row pass, read by the fixed-order reduction
    dram = (b * k * score_bytes  # column max
            + b * k * score_bytes + q + partials  # init: read scores, write Q', partials
            + (iters - 1) * (q + partials)  # steps: one read of Q'
            + 2 * q)  # finish: read and write Q' in place
    flops = b * k * (4 + (iters - 1) * 4 + 4)  # shift, exp, sums; a multiply-add per entry per pass
    launches = 1 + 2 + 2 * (iters - 1) + 1
    out = {"shape": dict(b=b, k=k, iters=iters, score_bytes=score_bytes), "flops": flops, "dram_bytes": dram,
           "launches": launches, "row_blocks": blocks, "target": target_text("sinkhorn")}
    out.update(bound(flops, "fp32", dram, dev))
    return out


def contrastive_model(dev, n=65536, m=65536, d=128, need_dk=True, in_bytes=2, symmetric=False, whole=True):
    """Forward + backward of the fused loss (csrc/kernels/contrastive.cuh): forward, then the dq kernel and (when
    the keys need a gradient) the dk kernel, each recomputing the logits tile by tile from the saved lse.
    symmetric: keys is queries (contrastive_loss(z, z, ...)): forward, then the one dz kernel (a logits GEMM and a
    product GEMM per tile pair, two exps per logit). whole: the kernels' plan keeps whole tiles (each block loads
    its own tile once and each tile of the other side once per visit, for both GEMMs), as it does at D = 128 in 16
    bits on an H100 / H200 (tests/test_cuda_emulated_contrastive.py checks that plan); else every tile pair streams
    both sides' 32-column panels for the logits and the other side's once more for the backward's products."""
    bq, bk, dk = (constexpr("contrastive.cuh", name) for name in ("kBQ", "kBK", "kDK"))
    # few query tiles: the forward and dq / dz kernels split the key tiles among blocks (split_count in the header)
    max_splits, min_tiles = (constexpr("contrastive.cuh", name) for name in ("kMaxSplits", "kMinSplitTiles"))
    row_tiles, want = math.ceil(n / bq), 2 * dev["sms"]
    splits = 1 if row_tiles >= want else max(1, min(math.ceil(want / row_tiles), math.ceil(m / bk) // min_tiles,
                                                    max_splits))
    if symmetric and (m != n or not need_dk):
        raise ValueError("the symmetric path has keys = queries: m == n and a gradient for both")
    gemm = 2 * n * m * d  # one N x M x D product
    if symmetric:
        kernels, flops, exps = 2, gemm * (1 + 2), n * m * (1 + 2)  # forward S; dz: S and H Z (H = dS + dS^T)
        dram = 2 * n * d * in_bytes * kernels + n * d * 4 + 3 * n * 4
    else:
        kernels = 2 + (1 if need_dk else 0)  # forward, dq, dk
        flops = gemm * (1 + 2 + (2 if need_dk else 0))  # forward S; dq: S and dS K; dk: S and dS^T Q
        exps = n * m * kernels  # one exp per logit per kernel
        dram = (n + m) * d * in_bytes * kernels + n * d * 4 + (m * d * 4 if need_dk else 0) + 3 * n * 4
    workspace = 0 if splits == 1 else 4 * splits * n * (3 + d)  # the forward's and dq's partials (fp32)
    dram += 2 * workspace  # written by the split blocks, read by the merge kernels
    sfu_rate = dev["sms"] * 16 * 1.83e9  # MUFU.EX2: 16 per clock per SM at ~1.83 GHz boost
    tiles = math.ceil(n / bq) * math.ceil(m / bk)
    if whole:  # per tile pair the other side's tile; per block its own tile, once (each split's block: again)
        l2 = tiles * bk * d * in_bytes * kernels + (n * splits + m) * d * in_bytes * kernels
    else:  # per tile pair both sides' panels for the logits, in backward the other side's again for the products
        l2 = tiles * d * in_bytes * ((bq + bk) + (kernels - 1) * (bq + 2 * bk))
    out = {"shape": dict(n=n, m=m, d=d, need_dk=need_dk, input_bytes=in_bytes, symmetric=symmetric, whole=whole),
           "tiles": dict(bq=bq, bk=bk, dk=dk), "splits": splits, "blocks": row_tiles * splits,
           "flops": flops, "exp_count": exps, "exp_ms_at_mufu_rate": round(exps / sfu_rate * 1e3, 4),
           "dram_bytes": dram, "l2_to_shared_bytes": l2, "l2_to_shared_ms": round(l2 / dev["l2"] * 1e3, 4),
           "arithmetic_intensity_vs_l2": round(flops / l2, 1), "launches": kernels + (2 if splits > 1 else 0),
           "extra_global_memory_bytes": 2 * n * 4 + workspace}
    out.update(bound(flops, "bf16" if in_bytes == 2 else "fp32", dram, dev))
    # the tiles re-read from L2 can be the nearer limit with these tile sizes: say which bound binds
    out["lower_bound_with_l2_ms"] = round(max(out["lower_bound_ms"], out["l2_to_shared_ms"],
                                              out["exp_ms_at_mufu_rate"]), 4)
    return out


def kmeans_model(dev, n=1_281_167, k=3000, d=128, tf32=True):
    """One Lloyd iteration: the fused assignment, then the update (ATen's stable sort + fixed-order sums)."""
    rows, cols, chunk = (constexpr("kmeans.cuh", name) for name in ("kRows", "kCols", "kChunk"))
    piece_rows = constexpr("kmeans.cuh", "kPieceRows")
    blocks = math.ceil(n / rows)
    assign_flops = 2 * n * k * d
    x_bytes = n * d * 4
    assign_dram = x_bytes + k * d * 4 + n * (4 + 8)  # x once (rows stay in shared memory), centroids, outputs
    assign_l2 = blocks * k * d * 4  # every block streams all centroids from L2
    pieces = math.ceil(n / piece_rows) + k
    sort_bytes = 4 * n * 8 * 2  # a stable radix sort of int64 keys and indices: a few passes (estimate)
    update_dram = x_bytes + n * 8 + sort_bytes + 2 * pieces * d * 8 + k * d * 4
    rate = "tf32" if tf32 else "fp32"
    assign = {"flops": assign_flops, "dram_bytes": assign_dram, "l2_to_shared_bytes": assign_l2,
              "l2_to_shared_ms": round(assign_l2 / dev["l2"] * 1e3, 4), "launches": 1,
              "arithmetic_intensity_vs_l2": round(assign_flops / assign_l2, 1)}
    assign.update(bound(assign_flops, rate, assign_dram, dev))
    update = {"dram_bytes": update_dram, "launches": 2 + 6, "note": "sort, bincount, two cumsums, the two kernels"}
    update.update(bound(2 * n * d, "fp32", update_dram, dev))
    total = assign["lower_bound_ms"] + update["lower_bound_ms"]
    return {"shape": dict(n=n, k=k, d=d, tf32=tf32), "tiles": dict(rows=rows, cols=cols, chunk=chunk),
            "assign": assign, "update": update, "lower_bound_ms": round(total, 4),
            "target": target_text("kmeans")}


def ptxas_usage(arch="90"):
    """Registers, shared memory and spills per kernel, from nvcc -Xptxas -v on csrc/*_cuda.cu."""
    import torch.utils.cpp_extension as ext
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    includes = [f"-I{p}" for p in ext.include_paths()]
    try:
        import nvidia
        includes += [f"-I{os.path.join(root, sub, 'include')}" for root in nvidia.__path__ for sub in os.listdir(root)
                     if os.path.isdir(os.path.join(root, sub, "include"))]
    except ImportError:
        pass
    import sysconfig
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    usage = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        if not name.endswith("_cuda.cu"):
            continue
        cmd = [nvcc, "-std=c++20", "-c", os.path.join(ROOT, "csrc", name), "-o", os.devnull, *includes, "-DWITH_CUDA",
               "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "--expt-relaxed-constexpr",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: nvcc failed on {name}:\n{proc.stderr[-2000:]}")
        current = None
        for line in proc.stderr.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = subprocess.run(["c++filt", m.group(1)], capture_output=True, text=True).stdout.strip()
                usage[current] = {"file": name}
            elif current and "bytes spill stores" in line:
                m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
                usage[current].update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
            elif current and "Used" in line and "registers" in line:
                m = re.search(r"Used (\d+) registers", line)
                usage[current]["registers"] = int(m.group(1))
                m = re.search(r"(\d+) bytes smem", line)
                usage[current]["static_smem_bytes"] = int(m.group(1)) if m else 0
    return usage


def model(device="h100"):
    dev = DEVICES[device]
    simclr = contrastive_model(dev, 65536, 65536, 128, symmetric=True)  # keys is queries (one process)
    simclr["target"] = target_text("contrastive")
    simclr_two = contrastive_model(dev, 65536, 65536, 128, need_dk=True)  # keys a tensor of their own
    simclr_two["target"] = target_text("contrastive")
    moco = contrastive_model(dev, 4096, 65536, 128, need_dk=False)  # the queue gets no gradient
    moco["target"] = target_text("moco")
    return {"device": dev["name"], "peaks": {k: v for k, v in dev.items() if k != "name"},
            "contrastive_simclr": simclr, "contrastive_simclr_two_tensors": simclr_two, "contrastive_moco": moco,
            "sinkhorn": sinkhorn_model(dev), "kmeans_iteration": kmeans_model(dev),
            "kmeans_iteration_fp32": kmeans_model(dev, tf32=False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="h100", choices=sorted(DEVICES))
    parser.add_argument("--ptxas", action="store_true", help="compile the CUDA kernels for sm_90 and report ptxas -v")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"command": " ".join(["python", "bench/perf_model.py", *sys.argv[1:]]), **model(args.device)}
    if args.ptxas:
        result["ptxas_sm90"] = ptxas_usage()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
