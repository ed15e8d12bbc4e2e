"""Benchmark of the custom ops (common/ops.py) against the PyTorch references and peers.

For each op: wall time (median of --repeat runs after a warm-up) and peak extra memory
of the compiled kernels, the pure-PyTorch reference, and the peers, all measured in
the same run, each in a fresh subprocess (CPU peak = high-water mark of the resident
set after /proc/self/clear_refs; CUDA peak = torch.cuda.max_memory_allocated), at the
SimCLR / MoCo / SwAV / DeepCluster-v2 shapes, on CPU and (when present) CUDA.

    python bench/ops.py [--device cpu|cuda|all] [--quick] [--out bench.json]

Peers: lightly's NTXentLoss and sinkhorn, the loss as MoCo's builder computes it, SwAV's
published Sinkhorn formula, faiss-cpu Kmeans and fast-pytorch-kmeans (skipped with a note
when not installed). Prints one JSON object: results per op and device, and the ratios each
op's bar is stated in (csrc/README.md).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import perf_model  # noqa: E402

SHAPES = {  # op -> device -> shape
    "contrastive": {"cpu": dict(n=8192, d=128, t=0.1), "cuda": dict(n=65536, d=128, t=0.1, dtype="bfloat16")},
    "moco": {"cpu": dict(n=1024, m=16384, d=128, t=0.2),
             "cuda": dict(n=4096, m=65536, d=128, t=0.2, dtype="bfloat16")},
    "sinkhorn": {"cpu": dict(b=4096, k=3000, eps=0.05, iters=3), "cuda": dict(b=7936, k=3000, eps=0.05, iters=3)},
    "kmeans": {"cpu": dict(n=100_000, d=128, k=1000, iters=10), "cuda": dict(n=1_280_000, d=128, k=3000, iters=10)},
}
QUICK = {
    "contrastive": dict(n=1024, d=64, t=0.1), "moco": dict(n=128, m=1024, d=64, t=0.2),
    "sinkhorn": dict(b=512, k=300, eps=0.05, iters=3),
    "kmeans": dict(n=5000, d=32, k=50, iters=5),
}
IMPLS = {
    "contrastive": ["compiled", "reference", "lightly_ntxent"],
    "moco": ["compiled", "reference", "moco_original"],
    "sinkhorn": ["compiled", "reference", "swav_formula", "lightly_sinkhorn"],
    "kmeans": ["compiled", "reference", "faiss", "fast_pytorch_kmeans"],
}


# ----------------------------------------------------------------------------- child side

def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Memory:
    def __init__(self, device):
        self.device = device

    def start(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the resident-set high-water mark (Linux >= 4.0)
            except OSError:
                pass
            self.base = _rss_kb("VmRSS") * 1024

    def peak_extra_mb(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return max(0, _rss_kb("VmHWM") * 1024 - self.base) / 2**20


def _contrastive(impl, device, shape):
    import torch
    import torch.nn.functional as F
    from common import ops
    n, d, t = shape["n"], shape["d"], shape["t"]
    dtype = getattr(torch, shape.get("dtype", "float32")) if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)
    pos = ((torch.arange(n) + n // 2) % n).to(device)
    self_index = torch.arange(n, device=device)
    if impl == "lightly_ntxent":
        from lightly.loss import NTXentLoss
        crit = NTXentLoss(temperature=t)
        z0, z1 = z[: n // 2].clone(), z[n // 2:].clone()

        def run():
            a, b = z0.detach().requires_grad_(), z1.detach().requires_grad_()
            loss = crit(a, b)
            loss.backward()
            return loss
        return run
    fn = ops.contrastive_loss if impl == "compiled" else ops.contrastive_loss_reference

    def run():
        zz = z.detach().requires_grad_()
        loss = fn(zz, zz, pos, t, self_index=self_index)
        loss.backward()
        return loss
    return run


def _moco(impl, device, shape):
    """MoCo's loss: n queries against [their n keys; a queue], m keys in all, positive i; the keys get no
    gradient. moco_original: the formula of MoCo's builder (positive and negative logits by einsum,
    concatenated, cross-entropy against class 0)."""
    import torch
    import torch.nn.functional as F
    from common import ops
    n, m, d, t = shape["n"], shape["m"], shape["d"], shape["t"]
    dtype = getattr(torch, shape.get("dtype", "float32")) if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)
    keys = F.normalize(torch.randn(m, d, generator=g), dim=1).to(device=device, dtype=dtype)
    pos = torch.arange(n, device=device)
    if impl == "moco_original":
        k, queue = keys[:n], keys[n:].t().contiguous()  # the builder keeps the queue as [D, K]
        labels = torch.zeros(n, dtype=torch.long, device=device)

        def run():
            qq = q.detach().requires_grad_()
            logits = torch.cat([torch.einsum("nc,nc->n", qq, k)[:, None], torch.einsum("nc,ck->nk", qq, queue)], 1)
            loss = F.cross_entropy(logits / t, labels)
            loss.backward()
            return loss
        return run
    fn = ops.contrastive_loss if impl == "compiled" else ops.contrastive_loss_reference

    def run():
        qq = q.detach().requires_grad_()
        loss = fn(qq, keys, pos, t)
        loss.backward()
        return loss
    return run


def _sinkhorn(impl, device, shape):
    import torch
    import torch.nn.functional as F
    from common import ops
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(shape["b"], shape["k"], generator=g), dim=1).to(device)
    eps, iters = shape["eps"], shape["iters"]
    if impl == "swav_formula":
        def run():
            with torch.no_grad():
                q = torch.exp(scores / eps).t()
                q /= q.sum()
                k, b = q.shape
                for _ in range(iters):
                    q /= q.sum(dim=1, keepdim=True)
                    q /= k
                    q /= q.sum(dim=0, keepdim=True)
                    q /= b
                q *= b
                return q.t()
        return run
    if impl == "lightly_sinkhorn":
        from lightly.loss.swav_loss import sinkhorn

        def run():
            with torch.no_grad():
                return sinkhorn(scores, iterations=iters, epsilon=eps)
        return run
    fn = ops.sinkhorn if impl == "compiled" else ops.sinkhorn_reference
    return lambda: fn(scores, eps, iters)


def _kmeans(impl, device, shape):
    import torch
    import torch.nn.functional as F
    from common import ops
    n, d, k, iters = shape["n"], shape["d"], shape["k"], shape["iters"]
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    init = x[torch.randperm(n, generator=g)[:k].to(device)].clone()
    state = {}
    if impl == "faiss":
        import faiss
        if device != "cpu":
            return None
        xn, initn = x.numpy(), init.numpy()

        def run():
            km = faiss.Kmeans(d, k, niter=iters, spherical=True, seed=0, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=10**9)
            km.train(xn, init_centroids=initn)
            state["centroids"] = torch.from_numpy(km.centroids)
        return run, x, state
    if impl == "fast_pytorch_kmeans":
        from fast_pytorch_kmeans import KMeans

        def run():
            km = KMeans(n_clusters=k, max_iter=iters, tol=-1.0, mode="cosine", verbose=0)
            km.fit_predict(x, centroids=init.clone())
            state["centroids"] = km.centroids
        return run, x, state
    # the GPU target is stated with TF32: the compiled kernel takes it as an argument, the others from torch's flag
    fn = (lambda *a, **kw: ops.kmeans(*a, tf32=device == "cuda", **kw)) if impl == "compiled" else ops.kmeans_reference

    def run():
        state["centroids"] = fn(x, k, n_iters=iters, spherical=True, init=init)[0]
    return run, x, state


def spherical_objective(x, centroids, chunk=16384):
    """Sum over points of |x - c|^2 on the unit sphere = sum (2 - 2 max cos)."""
    import torch
    import torch.nn.functional as F
    c = F.normalize(centroids.to(x.device, torch.float32), dim=1)
    total = 0.0
    for s in range(0, x.shape[0], chunk):
        total += float((2 - 2 * (x[s:s + chunk] @ c.t()).max(dim=1).values).double().sum())
    return total


def child(op, impl, device, shape, repeat, threads):
    import torch
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = op == "kmeans"  # the k-means GPU target is stated with TF32 (peers)
        torch.backends.cudnn.allow_tf32 = op == "kmeans"
    made = {"contrastive": _contrastive, "moco": _moco, "sinkhorn": _sinkhorn, "kmeans": _kmeans}[op](impl, device,
                                                                                                      shape)
    if made is None:
        return {"skipped": "not available on this device"}
    run, x, state = made if isinstance(made, tuple) else (made, None, None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    mem = Memory(device)
    mem.start()
    run()
    sync()
    peak = mem.peak_extra_mb()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    out = {"time_ms": 1e3 * statistics.median(times), "times_ms": [round(1e3 * t, 2) for t in times],
           "peak_extra_mb": round(peak, 2)}
    if op == "kmeans":
        out["objective"] = spherical_objective(x, state["centroids"])
        out["ms_per_iteration"] = out["time_ms"] / shape["iters"]
    if impl == "compiled":
        from common import ops
        out["backend"] = ops.backend(device)
    return out


# ----------------------------------------------------------------------------- parent side

def run_child(op, impl, device, shape, repeat, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(
        dict(op=op, impl=impl, device=device, shape=shape, repeat=repeat, threads=threads))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        return {"skipped": tail[0][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(results, a, b, key="time_ms"):
    try:
        return round(results[a][key] / results[b][key], 4)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


# op -> (perf_model, its device entry, the shape) -> the lower bound in ms of the whole call bench/ops.py times
MODELLED = {
    "contrastive": lambda pm, dev, s: pm.contrastive_model(dev, s["n"], s["n"], s["d"],
                                                           symmetric=True)["lower_bound_ms"],  # fn(z, z, ...)
    "moco": lambda pm, dev, s: pm.contrastive_model(dev, s["n"], s["m"], s["d"], need_dk=False)["lower_bound_ms"],
    "sinkhorn": lambda pm, dev, s: pm.sinkhorn_model(dev, s["b"], s["k"], s["iters"])["lower_bound_ms"],
    "kmeans": lambda pm, dev, s: pm.kmeans_model(dev, s["n"], s["k"], s["d"])["lower_bound_ms"] * s["iters"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--ops", default="contrastive,moco,sinkhorn,kmeans")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: default)")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--out", help="also write the JSON here (after each op)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(**spec)))
        return
    import torch
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    report = {"torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "results": {}, "ratios": {}}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    for device in devices:
        for op in args.ops.split(","):
            shape = QUICK[op] if args.quick else SHAPES[op][device]
            res = {"shape": shape}
            for impl in IMPLS[op]:
                res[impl] = run_child(op, impl, device, shape, args.repeat, args.threads)
                print(f"# {device} {op} {impl}: {res[impl]}", file=sys.stderr, flush=True)
            report["results"][f"{op}/{device}"] = res
            r = {}
            if op == "contrastive":
                r["time_vs_reference"] = ratio(res, "compiled", "reference")
                r["peak_memory_vs_reference"] = ratio(res, "compiled", "reference", "peak_extra_mb")
                r["time_vs_lightly_ntxent"] = ratio(res, "compiled", "lightly_ntxent")
                r["target"] = "time <= 0.5, memory <= 0.0625 (CPU); GPU: " + perf_model.target_text("contrastive")
            elif op == "moco":
                r["time_vs_reference"] = ratio(res, "compiled", "reference")
                r["peak_memory_vs_reference"] = ratio(res, "compiled", "reference", "peak_extra_mb")
                r["time_vs_moco_original"] = ratio(res, "compiled", "moco_original")
                r["target"] = "GPU: " + perf_model.target_text("moco")
            elif op == "sinkhorn":
                r["time_vs_swav_formula"] = ratio(res, "compiled", "swav_formula")
                r["time_vs_reference"] = ratio(res, "compiled", "reference")
                r["time_vs_lightly_sinkhorn"] = ratio(res, "compiled", "lightly_sinkhorn")
                r["target"] = "time <= 0.3 x SwAV formula (CPU); GPU: " + perf_model.target_text("sinkhorn")
            else:
                r["time_vs_faiss"] = ratio(res, "compiled", "faiss")
                r["objective_vs_faiss"] = ratio(res, "compiled", "faiss", "objective")
                r["time_vs_reference"] = ratio(res, "compiled", "reference")
                r["time_vs_fast_pytorch_kmeans"] = ratio(res, "compiled", "fast_pytorch_kmeans")
                r["target"] = ("time <= 0.6 x faiss, objective <= 1.01 x faiss (CPU); GPU: "
                               + perf_model.target_text("kmeans"))
            if device == "cuda" and not args.quick and op in MODELLED:
                # bench/perf_model.py's lower bound for this GPU at the same shape, beside the measured time
                dev = perf_model.DEVICES["h200" if "H200" in report["gpu"] else "h100"]
                bound_ms = round(MODELLED[op](perf_model, dev, shape), 4)
                r["model_lower_bound_ms"] = bound_ms
                compiled_ms = (res.get("compiled") or {}).get("time_ms")
                r["measured_vs_model_bound"] = round(compiled_ms / bound_ms, 2) if compiled_ms else None
            report["ratios"][f"{op}/{device}"] = r
            if args.out:  # after every op, so that a run stopped part-way keeps what it measured
                write_json(args.out, report)
    print(json.dumps(report, indent=1))


def write_json(path, report):
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
