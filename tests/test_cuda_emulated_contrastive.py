"""The fused CUDA contrastive loss (csrc/kernels/contrastive.cuh), run on the CPU emulator.

The kernel source that nvcc compiles into common._C, built with the host compiler against
csrc/emu/cuda_emu.h as in tests/test_cuda_emulated.py (whose harness and helpers this file
reuses), checked against float64 on the inputs' exact values at sizes that are not multiples
of the 64 x 64 tiles or of the 32 columns of D per pass, with NaN guard bands around every
buffer. The float32 cases run under both scheduling orders; the 16-bit cases alternate between
them, and for each path one case is shown to give the same bits under both orders and under each
of the kernels' three plans (whole tiles in shared memory, or streamed 32-column panels with the
accumulators in shared memory or in the output rows), so each plan is as exact as the one
checked against float64. keys is queries (the dz kernel) is checked the same way. The last tests
plant faults (missing or misplaced barriers) into a copy of the kernels and show each one fails.

Tolerances. float32 inputs: as tests/test_ops.py, the error is at most the naive float32
formula's (PyTorch, same inputs) plus F32_TOL times the largest entry (at least 1). 16-bit
inputs: the reference is float64 on the rounded inputs, so input rounding is no error. The
forward products of 16-bit values are exact in fp32 and summed in fp32, so loss and lse keep
the float32 rule. Backward casts dS to the input type for the tensor cores (after scaling it
by a power of two into fp16's normal range), which gives each entry a relative error of at
most u = 2^-11 (fp16) or 2^-8 (bf16); entry (i, d) of dq = dS K / T can therefore be off by
u * sum_j |dS_ij| |k_jd| / T (dk: u * sum_i |dS_ij| |q_id| / T), on top of the naive float32
error and F32_TOL times the largest entry (here without the floor of 1, so that tiny
gradients are held to the same relative standard).
"""
import ctypes
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import ops
from tests.test_cuda_emulated import CSRC, CXX, ORDERS, EmulatorFault, Emulated, Guarded

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (set CXX) to build the emulated kernels")

H100_SHARED = 227 * 1024  # sharedMemPerBlockOptin
H100_SMS = 132  # multiProcessorCount (H100 SXM5, H200)
F32_TOL = 2e-5  # tests/test_ops.py's slack on top of the naive float32 formula's error
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def contrastive_library(emu):
    """Registers the contrastive entry points of csrc/emu/harness_contrastive.cpp on the library."""
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    err = [ctypes.c_char_p, i32]
    emu.lib.emu_contrastive_forward.argtypes = [i32, ptr, ptr, ptr, ptr, i64, i64, i64, f32, ptr, ptr, i64, i32, ptr,
                                                *err]
    emu.lib.emu_contrastive_backward.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32, i32, i32, ptr,
                                                 ptr, i64, i32, ptr, *err]
    emu.lib.emu_contrastive_backward_sym.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, i64, i64, f32, ptr, i64, i32, ptr,
                                                     *err]
    emu.lib.emu_contrastive_workspace.argtypes = [i32, i64, i64, i64, i32]
    emu.lib.emu_contrastive_workspace.restype = i64
    emu.lib.emu_contrastive_plan.argtypes = [i32, i64, i64, i32, i32]
    emu.lib.emu_contrastive_plan.restype = i64
    return emu


def plan(emu, dtype, d, max_shared, backward=True, sym=False):
    """The kernels' plan at feature size d: (columns of D per panel, accumulators in shared memory).
    A panel of at least d columns means whole tiles: each loaded once and kept for both GEMMs."""
    v = emu.lib.emu_contrastive_plan(CODES[dtype], d, max_shared, int(backward), int(sym))
    return v // 2, bool(v % 2)


def splits(emu, n, m, sm_count=H100_SMS):
    """How many blocks per query tile share the key tiles (1: no split)."""
    return emu.lib.emu_contrastive_workspace(2, n, m, 0, sm_count)


def workspace(emu, which, n, m, d, sm_count):
    """A poisoned workspace of the size the kernels ask for (which 0: forward, 1: dq / dz)."""
    return Guarded.poisoned((max(1, emu.lib.emu_contrastive_workspace(which, n, m, d, sm_count)),), np.float32)


def whole(d):
    """The panel width of whole tiles: d rounded up to the 32-column chunks."""
    return max(32, -(-d // 32) * 32)


# max_shared values that give the three plans at D = 33 (every dtype; backward and dz): whole tiles,
# streamed panels with the accumulators in shared memory, streamed panels accumulating in the output
PLANS_33 = {H100_SHARED: (64, True), 50_000: (32, True), 40_000: (32, False)}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return contrastive_library(Emulated(CSRC, tmp_path_factory.mktemp("emu")))


# ----------------------------------------------------------------------------- inputs and references

def inputs(layout, n, m, d, seed, dtype):
    """Unit-norm queries [n, d] and keys [m, d] in `dtype`, positives, self columns (or None).

    simclr: n = m = 2B views, the other view of the same image is the positive, the view itself
    is left out. moco: queries against [their own keys; a queue], positive i, nothing left out.
    random / random+self: a random positive (and a random other column left out).
    """
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    if layout == "simclr":
        assert n == m and n % 2 == 0
        k, pos, self_index = q.clone(), (torch.arange(n) + n // 2) % n, torch.arange(n)
    else:
        k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
        if layout == "moco":
            assert m >= n
            pos, self_index = torch.arange(n), None
        else:
            pos = torch.randint(0, m, (n,), generator=g)
            self_index = (pos + 1 + torch.randint(0, m - 1, (n,), generator=g)) % m if layout == "random+self" else None
    return q.to(dtype), k.to(dtype), pos, self_index


def row_weights(n):
    """dL/dloss_i: uneven, as a weighted mean would give (float32, as the kernels read it)."""
    return torch.linspace(0.5, 1.5, n, dtype=torch.float32)


def raw(t):
    """The tensor's bytes as numpy (16-bit floats as raw uint16)."""
    t = t.contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


class Shifted(Guarded):
    """A Guarded copy whose values start one element past a 64-byte boundary (a tensor whose storage
    offset is odd), so no row is 16-byte aligned."""

    def __init__(self, values):
        values = np.ascontiguousarray(values)
        super().__init__(np.concatenate([np.zeros(1, values.dtype), values.ravel()]))
        self.shape = values.shape

    @property
    def ptr(self):
        return super().ptr + self.buf.itemsize


def forward_on(emu, code, gq, gk, n, m, d, pos, self_index, temperature, grad_rows, max_shared, sm_count):
    """The emulated forward on the placed queries gq [n, d] and keys gk [m, d] of dtype code `code`; returns
    (by name) the buffers the backward needs, with its workspace, all guarded, and the self_index pointer."""
    gpos = Guarded(pos.numpy().astype(np.int64))
    gself = None if self_index is None else Guarded(self_index.numpy().astype(np.int64))
    self_ptr = None if gself is None else gself.ptr
    loss, lse = Guarded.poisoned((n,), np.float32), Guarded.poisoned((n,), np.float32)
    ws_f, ws_b = workspace(emu, 0, n, m, d, sm_count), workspace(emu, 1, n, m, d, sm_count)
    emu.call("emu_contrastive_forward", code, gq.ptr, gk.ptr, gpos.ptr, self_ptr, n, m, d,
             1.0 / temperature, loss.ptr, lse.ptr, max_shared, sm_count, ws_f.ptr)
    buffers = {"pos_index": gpos, "loss": loss, "lse": lse, "lse copy": Guarded(lse.value()),
               "grad_rows": Guarded(grad_rows.numpy().astype(np.float32)), "forward workspace": ws_f,
               "backward workspace": ws_b}
    if gself is not None:
        buffers["self_index"] = gself
    return buffers, self_ptr


def assert_intact(buffers):
    for name, g in buffers.items():
        assert g.intact(), f"a kernel wrote outside {name}"


def emulated(emu, q, k, pos, self_index, temperature, grad_rows, need_dq=True, need_dk=True,
             max_shared=H100_SHARED, unaligned=False, sm_count=H100_SMS):
    """Forward, then backward with grad_rows, on the emulated kernels: float64 (loss, lse, dq, dk).

    dq / dk are None when not requested; their buffers must then come back untouched. unaligned:
    the queries and keys start one element past an aligned address."""
    n, d = q.shape
    m = k.shape[0]
    place = Shifted if unaligned else Guarded
    gq, gk = place(raw(q)), place(raw(k))
    b, self_ptr = forward_on(emu, CODES[q.dtype], gq, gk, n, m, d, pos, self_index, temperature, grad_rows,
                             max_shared, sm_count)
    dq, dk = Guarded.poisoned((n, d), np.float32), Guarded.poisoned((m, d), np.float32)
    emu.call("emu_contrastive_backward", CODES[q.dtype], gq.ptr, gk.ptr, b["pos_index"].ptr, self_ptr,
             b["lse copy"].ptr, b["grad_rows"].ptr, n, m, d, 1.0 / temperature, int(need_dq), int(need_dk), dq.ptr,
             dk.ptr, max_shared, sm_count, b["backward workspace"].ptr)
    assert_intact({**b, "queries": gq, "keys": gk, "dq": dq, "dk": dk})
    loss, lse = b["loss"], b["lse"]
    for name, g, needed in [("dq", dq, need_dq), ("dk", dk, need_dk)]:
        if not needed:
            assert (g.buf.view(np.uint8) == 0xFF).all(), f"{name} was not requested but written"
    out = lambda g: torch.from_numpy(g.value()).double()  # noqa: E731
    return out(loss), out(lse), out(dq) if need_dq else None, out(dk) if need_dk else None


def reference(q, k, pos, self_index, temperature, grad_rows, dtype=torch.float64):
    """(loss, lse, dq, dk) by the plain formula in `dtype` (autograd for the gradients), as float64."""
    qq, kk = q.detach().to(dtype).requires_grad_(), k.detach().to(dtype).requires_grad_()
    loss = ops.contrastive_loss_reference(qq, kk, pos, temperature, self_index, "none")
    (loss * grad_rows.to(dtype)).sum().backward()
    with torch.no_grad():
        logits = masked_logits(qq, kk, self_index, temperature)
        lse = torch.logsumexp(logits, dim=1)
    return loss.detach().double(), lse.double(), qq.grad.double(), kk.grad.double()


def masked_logits(q, k, self_index, temperature):
    logits = q @ k.t() / temperature
    if self_index is not None:
        logits[torch.arange(len(q)), self_index] = -float("inf")
    return logits


def grad_logits(q, k, pos, self_index, temperature, grad_rows):
    """dL/dlogits in float64: g_i (softmax_ij - [j == pos_i]), 0 at the self column."""
    q, k = q.double(), k.double()
    p = torch.softmax(masked_logits(q, k, self_index, temperature), dim=1)
    p[torch.arange(len(q)), pos] -= 1.0
    return grad_rows.double()[:, None] * p


def assert_f32_rule(name, ours, naive, truth):
    err, naive_err = (ours - truth).abs().max().item(), (naive - truth).abs().max().item()
    scale = max(1.0, truth.abs().max().item())
    assert err <= naive_err + F32_TOL * scale, (name, err, naive_err)


def assert_half_rule(name, ours, naive, truth, bound, u):
    """Entry-wise: |ours - truth| <= u * bound + the naive float32 error + F32_TOL * max |truth|."""
    slack = (naive - truth).abs().max().item() + F32_TOL * truth.abs().max().item()
    excess = (ours - truth).abs() - (u * bound + slack)
    assert excess.max().item() <= 0, (name, excess.max().item(), (ours - truth).abs().max().item(), slack)


def check(emu, layout, n, m, d, temperature, dtype, seed=0, **kw):
    """The emulated kernels against float64 on the inputs' exact values; returns their outputs."""
    q, k, pos, self_index = inputs(layout, n, m, d, seed or n * 7 + m + d, dtype)
    g = row_weights(n)
    ours = emulated(emu, q, k, pos, self_index, temperature, g, **kw)
    truth = reference(q.float(), k.float(), pos, self_index, temperature, g)
    naive = reference(q.float(), k.float(), pos, self_index, temperature, g, torch.float32)
    for name, o, nv, t in zip(("loss", "lse"), ours, naive, truth):
        assert_f32_rule(name, o, nv, t)
    if dtype == torch.float32:
        for name, o, nv, t in zip(("dq", "dk"), ours[2:], naive[2:], truth[2:]):
            if o is not None:
                assert_f32_rule(name, o, nv, t)
    else:
        ds = grad_logits(q, k, pos, self_index, temperature, g).abs()
        bounds = (ds @ k.double().abs() / temperature, ds.t() @ q.double().abs() / temperature)
        for name, o, nv, t, b in zip(("dq", "dk"), ours[2:], naive[2:], truth[2:], bounds):
            if o is not None:
                assert_half_rule(name, o, nv, t, b, UNIT_ROUNDOFF[dtype])
    return ours


# ----------------------------------------------------------------------------- float32 (SIMT FMA path)

F32_CASES = [  # (layout, N, M, D, temperature); D % 4 == 0: 16-byte loads
    ("random", 1, 7, 17, 0.07),
    ("random+self", 1, 7, 17, 0.07),
    ("random", 7, 37, 1, 0.2),
    ("random+self", 7, 37, 1, 0.2),
    ("random", 37, 75, 33, 1.0),
    ("random+self", 37, 75, 33, 1.0),
    ("random", 75, 130, 70, 0.07),
    ("random+self", 130, 37, 70, 0.2),
    ("simclr", 74, 74, 33, 0.07),
    ("simclr", 130, 130, 17, 1.0),
    ("moco", 37, 130, 33, 0.2),
    ("moco", 75, 300, 70, 0.07),
    ("random+self", 75, 130, 64, 0.2),
    ("simclr", 74, 74, 40, 0.07),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: "-".join(map(str, c)))
def test_float32_matches_float64(emu, order, case):
    emu.order(order)
    check(emu, *case, torch.float32)


def test_float32_does_not_depend_on_scheduling_or_placement(emu):
    """No atomics, fixed summation order: both orders, under each of the three plans (whole tiles,
    or streamed panels with the accumulators in shared memory or in the output rows), give the
    same bits."""
    q, k, pos, self_index = inputs("random+self", 75, 130, 70, 3, torch.float32)
    g = row_weights(75)
    placements = {H100_SHARED: (96, True), 60_000: (32, True), 40_000: (32, False)}
    for max_shared, expected in placements.items():
        assert plan(emu, torch.float32, 70, max_shared) == expected
    assert plan(emu, torch.float32, 70, H100_SHARED, backward=False)[0] == 96
    assert plan(emu, torch.float32, 70, 40_000, backward=False)[0] == 32
    runs = []
    for order in ORDERS:
        emu.order(order)
        for max_shared in placements:
            runs.append(emulated(emu, q, k, pos, self_index, 0.1, g, max_shared=max_shared))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("need_dq,need_dk", [(True, False), (False, True)])
def test_only_the_requested_gradient_is_computed(emu, need_dq, need_dk):
    """need_dq / need_dk skip the other kernel (its buffer stays poisoned, checked in emulated());
    the requested one has the same bits as when both are computed."""
    emu.order("high-first")
    q, k, pos, self_index = inputs("random+self", 37, 75, 33, 5, torch.float32)
    g = row_weights(37)
    both = emulated(emu, q, k, pos, self_index, 0.2, g)
    one = emulated(emu, q, k, pos, self_index, 0.2, g, need_dq=need_dq, need_dk=need_dk)
    assert torch.equal(one[0], both[0])
    assert (one[2] is None) != need_dq and (one[3] is None) != need_dk
    for a, b in zip(one[2:], both[2:]):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("with_self", [True, False])
def test_zero_features(emu, dtype, with_self):
    """D == 0: every logit is 0, so the loss is log(number of columns not left out)."""
    emu.order("low-first")
    n, m = 7, 37
    q, k = torch.zeros(n, 0, dtype=dtype), torch.zeros(m, 0, dtype=dtype)
    pos = torch.arange(n) * 3
    self_index = pos + 1 if with_self else None
    loss, lse, dq, dk = emulated(emu, q, k, pos, self_index, 0.2, row_weights(n))
    expected = torch.full((n,), np.log(m - 1 if with_self else m), dtype=torch.float64)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0) and torch.equal(lse, loss)
    assert dq.shape == (n, 0) and dk.shape == (m, 0)


def test_launches_for_any_size(emu):
    """Every launch's grid and shared memory fit the hardware limits, opting in above 48 KiB
    (checked, not run): 2^31 - 1 queries or keys, D large enough for either placement."""
    emu.lib.emu_set_dry_run(1)
    try:
        for dtype, code in CODES.items():
            for n, m, d in [(2 ** 31 - 1, 65536, 128), (4096, 2 ** 31 - 1, 200), (5, 7, 4096)]:
                for max_shared in (H100_SHARED, 48 * 1024):
                    emu.call("emu_contrastive_forward", code, None, None, None, None, n, m, d, 5.0, None, None,
                             max_shared, H100_SMS, None)
                    emu.call("emu_contrastive_backward", code, None, None, None, None, None, None, n, m, d, 5.0, 1, 1,
                             None, None, max_shared, H100_SMS, None)
                    emu.call("emu_contrastive_backward_sym", code, None, None, None, None, None, n, d, 5.0, None,
                             max_shared, H100_SMS, None)
            assert plan(emu, dtype, 200, H100_SHARED) == (32, True)  # > 48 KiB: opted in
            assert plan(emu, dtype, 4096, H100_SHARED) == (32, False)
    finally:
        emu.lib.emu_set_dry_run(0)


@pytest.mark.parametrize("dtype", list(CODES))
def test_rows_not_16_byte_aligned_take_the_element_loads(emu, dtype):
    """D a multiple of 16 bytes but the inputs one element off an aligned address (a tensor with an odd
    storage offset): the kernels load element by element and give the bits of the aligned inputs,
    which take the 16-byte loads."""
    emu.order("low-first")
    q, k, pos, self_index = inputs("random+self", 37, 75, 64, 8, dtype)
    g = row_weights(37)
    aligned = emulated(emu, q, k, pos, self_index, 0.2, g)
    for a, b in zip(aligned, emulated(emu, q, k, pos, self_index, 0.2, g, unaligned=True)):
        assert torch.equal(a, b)


def test_emulator_refuses_unaligned_16_byte_loads(tmp_path):
    """Without the alignment test, the 16-byte loads of unaligned rows fail under the emulator (on
    a GPU: a misaligned-address fault)."""
    faulty = planted_library("  if (D % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {\n",
                             "  if (D % kVec == 0) {\n", tmp_path)
    faulty.order("low-first")
    q, k, pos, self_index = inputs("random+self", 37, 75, 64, 8, torch.bfloat16)
    emulated(faulty, q, k, pos, self_index, 0.2, row_weights(37))  # aligned: fine
    with pytest.raises(EmulatorFault, match="16-byte"):
        emulated(faulty, q, k, pos, self_index, 0.2, row_weights(37), unaligned=True)


# ----------------------------------------------------------------------------- key tiles split among blocks

SPLIT_CASES = [  # (layout, N, M, D, temperature, dtype, splits on an H100)
    ("moco", 37, 1000, 33, 0.2, torch.float32, 8),
    ("random+self", 75, 700, 64, 0.07, torch.float32, 5),
    ("random", 7, 300, 17, 1.0, torch.float32, 2),
    ("moco", 37, 1000, 64, 0.2, torch.bfloat16, 8),
    ("random+self", 75, 700, 33, 0.07, torch.float16, 5),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_split_keys_match_float64(emu, order, case):
    """Few query tiles: the key tiles are split among blocks (MoCo's 4096 queries make 64 query tiles
    for 132 SMs), their partials merged in order; as exact as one block per query tile."""
    *case, dtype, expected = case
    assert splits(emu, case[1], case[2]) == expected
    emu.order(order)
    check(emu, *case, dtype)


@pytest.mark.parametrize("dtype", list(CODES))
def test_split_keys_do_not_depend_on_scheduling_or_placement(emu, dtype):
    """Split over 8 blocks per query tile: the same bits under both orders and the three plans; and the
    same values as unsplit (sm_count 0) to float32 rounding (another summation order)."""
    q, k, pos, self_index = inputs("random+self", 37, 1000, 33, 12, dtype)
    g = row_weights(37)
    assert splits(emu, 37, 1000) == 8 and splits(emu, 37, 1000, sm_count=0) == 1
    runs = []
    for i, max_shared in enumerate(PLANS_33):
        emu.order(list(ORDERS)[i % 2])
        runs.append(emulated(emu, q, k, pos, self_index, 0.2, g, max_shared=max_shared))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
    unsplit = emulated(emu, q, k, pos, self_index, 0.2, g, sm_count=0)
    for a, b in zip(runs[0], unsplit):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_split_counts(emu):
    """One block per query tile once the query tiles fill the GPU twice over; else enough splits for that,
    each with at least two key tiles, at most 64; so the workspace's S x N stays under 256 x the SMs."""
    assert splits(emu, 65536, 65536) == 1  # SimCLR at 2N = 65536: 1024 query tiles
    assert splits(emu, 4096, 65536) == 5  # MoCo: 64 query tiles, 320 blocks
    assert splits(emu, 64, 65536) == 64  # at most 64
    assert splits(emu, 64, 256) == 2 and splits(emu, 64, 128) == 1  # two key tiles per block at least
    for n in (1, 37, 64, 4096, 16000, 16895, 16896):
        assert splits(emu, n, 2 ** 20) * n < 256 * H100_SMS, n
    assert splits(emu, 16896, 2 ** 20) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sym_split_matches_float64(emu, dtype):
    """The dz kernel split over its key tiles (260 rows: 5 query tiles, 2 splits each)."""
    assert splits(emu, 260, 260) == 2
    emu.order("high-first")
    check_sym(emu, "simclr", 260, 17, 0.1, dtype)


# ----------------------------------------------------------------------------- fp16 / bf16 (wmma path)

HALF_CASES = [  # (layout, N, M, D, temperature); D % 8 == 0: 16-byte loads
    ("simclr", 74, 74, 33, 0.07),
    ("moco", 37, 130, 17, 0.2),
    ("random+self", 75, 37, 70, 1.0),
    ("random+self", 75, 130, 72, 0.2),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", HALF_CASES, ids=lambda c: "-".join(map(str, c)))
def test_half_matches_float64(emu, dtype, case):
    """Each case under one scheduling order (both are covered across the cases, and
    test_half_does_not_depend_on_scheduling runs one case under both)."""
    emu.order(list(ORDERS)[HALF_CASES.index(case) % 2])
    check(emu, *case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_does_not_depend_on_scheduling(emu, dtype):
    """As for float32: the same bits under both orders and the three plans."""
    q, k, pos, self_index = inputs("random+self", 75, 130, 33, 9, dtype)
    g = row_weights(75)
    runs = []
    for i, (max_shared, expected) in enumerate(PLANS_33.items()):
        assert plan(emu, dtype, 33, max_shared) == expected
        emu.order(list(ORDERS)[i % 2])
        runs.append(emulated(emu, q, k, pos, self_index, 0.2, g, max_shared=max_shared))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_target_shapes_keep_whole_tiles(emu, dtype):
    """bench/perf_model.py assumes that at D = 128 in 16 bits every kernel keeps whole tiles, with its
    accumulators in shared memory, on an H100 / H200 (227 KiB per block with opt-in)."""
    for backward, sym in [(False, False), (True, False), (True, True)]:
        assert plan(emu, dtype, 128, H100_SHARED, backward, sym) == (128, backward), (backward, sym)


def test_fp16_backward_keeps_the_negatives_gradient(emu):
    """MoCo's regime: mean over many rows and a long queue make dS_ij = g_i p_ij ~ 1e-9 (MoCo v2:
    g = 1/4096, p ~ 1/65536), below fp16's smallest subnormal (6e-8). Here N=37, M=300 with g_i =
    2^-15 / N: the plain cast of dS to fp16 flushes most negatives to zero and loses their share
    of dq; the kernel's power-of-two scaling keeps dq within the fp16 rule."""
    emu.order("low-first")
    n, m, d, temperature = 37, 300, 17, 0.2
    q, k, pos, self_index = inputs("moco", n, m, d, 11, torch.float16)
    g = torch.full((n,), 2.0 ** -15 / n, dtype=torch.float32)
    ds = grad_logits(q, k, pos, self_index, temperature, g)
    negatives = ds.clone()
    negatives[torch.arange(n), pos] = 0
    lost = ((negatives.half() == 0) & (negatives != 0)).sum().item() / (negatives != 0).sum().item()
    assert lost > 0.5, lost  # what an unscaled cast would do

    _, _, dq, dk = emulated(emu, q, k, pos, self_index, temperature, g, need_dk=False)  # the queue gets no gradient
    assert dk is None
    _, _, truth, _ = reference(q.float(), k.float(), pos, self_index, temperature, g)
    _, _, naive, _ = reference(q.float(), k.float(), pos, self_index, temperature, g, torch.float32)
    kd = k.double()
    bound = ds.abs() @ kd.abs() / temperature
    u = UNIT_ROUNDOFF[torch.float16]
    assert_half_rule("dq", dq, naive, truth, bound, u)
    unscaled = ds.half().double() @ kd / temperature  # dq from the plain cast (products and sums exact)
    with pytest.raises(AssertionError):
        assert_half_rule("dq (unscaled cast)", unscaled, naive, truth, bound, u)
    # the negatives' share of dq: mostly lost by the plain cast; kept by the kernel within the norm of
    # the entry-wise bound u * bound (which also covers the positives' rounding)
    share = negatives @ kd / temperature
    positive_part = (ds - negatives) @ kd / temperature

    def share_error(dq_):
        return ((dq_ - positive_part) - share).norm().item() / share.norm().item()

    assert share_error(unscaled) > 0.5, share_error(unscaled)
    assert share_error(dq) <= u * bound.norm().item() / share.norm().item(), share_error(dq)


# ----------------------------------------------------------------------------- keys is queries (the dz kernel)

def emulated_sym(emu, z, pos, self_index, temperature, grad_rows, max_shared=H100_SHARED, sm_count=H100_SMS):
    """The loss with keys = queries = z: forward(z, z), then the dz kernel; float64 (loss, lse, dz)."""
    n, d = z.shape
    gz = Guarded(raw(z))
    b, self_ptr = forward_on(emu, CODES[z.dtype], gz, gz, n, n, d, pos, self_index, temperature, grad_rows,
                             max_shared, sm_count)
    dz = Guarded.poisoned((n, d), np.float32)
    emu.call("emu_contrastive_backward_sym", CODES[z.dtype], gz.ptr, b["pos_index"].ptr, self_ptr, b["lse copy"].ptr,
             b["grad_rows"].ptr, n, d, 1.0 / temperature, dz.ptr, max_shared, sm_count, b["backward workspace"].ptr)
    assert_intact({**b, "z": gz, "dz": dz})
    return tuple(torch.from_numpy(g.value()).double() for g in (b["loss"], b["lse"], dz))


def reference_sym(z, pos, self_index, temperature, grad_rows, dtype=torch.float64):
    """(loss, lse, dz) by the plain formula in `dtype` with one tensor as queries and keys."""
    zz = z.detach().to(dtype).requires_grad_()
    loss = ops.contrastive_loss_reference(zz, zz, pos, temperature, self_index, "none")
    (loss * grad_rows.to(dtype)).sum().backward()
    with torch.no_grad():
        lse = torch.logsumexp(masked_logits(zz, zz, self_index, temperature), dim=1)
    return loss.detach().double(), lse.double(), zz.grad.double()


def check_sym(emu, layout, n, d, temperature, dtype, g_scale=1.0, max_shared=H100_SHARED, sm_count=H100_SMS):
    """The dz kernel against float64, with the rules of check(); for 16-bit inputs the cast of
    H = dS + dS^T bounds dz's entry (a, e) by u * sum_j (|dS_aj| + |dS_ja|) |z_je| / T."""
    z, _, pos, self_index = inputs(layout, n, n, d, n * 7 + d, dtype)
    g = row_weights(n) * g_scale
    ours = emulated_sym(emu, z, pos, self_index, temperature, g, max_shared, sm_count)
    truth = reference_sym(z.float(), pos, self_index, temperature, g)
    naive = reference_sym(z.float(), pos, self_index, temperature, g, torch.float32)
    for name, o, nv, t in zip(("loss", "lse"), ours, naive, truth):
        assert_f32_rule(name, o, nv, t)
    if dtype == torch.float32:
        assert_f32_rule("dz", ours[2], naive[2], truth[2])
    else:
        ds = grad_logits(z, z, pos, self_index, temperature, g).abs()
        bound = (ds + ds.t()) @ z.double().abs() / temperature
        assert_half_rule("dz", ours[2], naive[2], truth[2], bound, UNIT_ROUNDOFF[dtype])
    return ours


SYM_CASES = [  # (layout, N, D, temperature): N = M, keys is queries
    ("simclr", 2, 1, 0.5),
    ("random", 1, 5, 0.1),
    ("simclr", 74, 33, 0.07),
    ("simclr", 130, 17, 1.0),
    ("random", 37, 70, 0.2),
    ("random+self", 75, 33, 0.07),
    ("random+self", 131, 65, 0.2),
    ("simclr", 130, 48, 0.07),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", SYM_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sym_float32_matches_float64(emu, order, case):
    emu.order(order)
    check_sym(emu, *case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [SYM_CASES[2], SYM_CASES[5], SYM_CASES[7]], ids=lambda c: "-".join(map(str, c)))
def test_sym_half_matches_float64(emu, dtype, case):
    emu.order(list(ORDERS)[SYM_CASES.index(case) % 2])
    check_sym(emu, *case, dtype)


def test_sym_fp16_keeps_tiny_gradients(emu):
    """g = 2^-20 x the usual weights: H would mostly flush to zero in a plain fp16 cast; the
    power-of-two scaling over the tile's rows and columns keeps dz within the fp16 rule."""
    emu.order("high-first")
    check_sym(emu, "simclr", 130, 33, 0.07, torch.float16, g_scale=2.0 ** -20)


def test_sym_equals_dq_plus_dk(emu):
    """dz and the dq and dk kernels' sum (keys a separate copy of z) agree to float32 rounding."""
    emu.order("low-first")
    z, _, pos, self_index = inputs("simclr", 74, 74, 33, 4, torch.float32)
    g = row_weights(74)
    loss, lse, dz = emulated_sym(emu, z, pos, self_index, 0.1, g)
    loss2, lse2, dq, dk = emulated(emu, z, z.clone(), pos, self_index, 0.1, g)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    assert torch.allclose(dz, dq + dk, rtol=0, atol=1e-5 * (dq + dk).abs().max().item())


@pytest.mark.parametrize("dtype", list(CODES))
def test_sym_does_not_depend_on_scheduling_or_placement(emu, dtype):
    """The same bits under both orders, accumulating in shared memory or in the output rows."""
    z, _, pos, self_index = inputs("random+self", 75, 75, 33, 6, dtype)
    g = row_weights(75)
    runs = []
    for order in ORDERS:
        emu.order(order)
        for max_shared, expected in PLANS_33.items():
            assert plan(emu, dtype, 33, max_shared, sym=True) == expected
            runs.append(emulated_sym(emu, z, pos, self_index, 0.2, g, max_shared))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- planted faults

# (the exact text in kernels/contrastive.cuh, what replaces it, the check that must then fail)
FAULTS = {
    "no barrier between loading the logits panels and the SIMT GEMM": (
        "  if (load_k) load_panel(sm, sm.ks, k, k0, M, D, d0);\n  __syncthreads();\n",
        "  if (load_k) load_panel(sm, sm.ks, k, k0, M, D, d0);\n",
        ("random+self", 37, 75, 33, 1.0, torch.float32)),
    "no barrier between loading the logits panels and the wmma GEMM": (
        "  if (load_k) load_panel(sm, sm.ks, k, k0, M, D, d0);\n  __syncthreads();\n",
        "  if (load_k) load_panel(sm, sm.ks, k, k0, M, D, d0);\n",
        ("random+self", 37, 75, 33, 1.0, torch.bfloat16)),
    "product pass starts before dS is complete and the logits GEMM is done with the panels": (
        "  const int ld = sm.ld;\n  __syncthreads();\n  if constexpr (Cfg<T>::kWmma) {\n    using namespace",
        "  const int ld = sm.ld;\n  if constexpr (Cfg<T>::kWmma) {\n    using namespace",
        ("random+self", 75, 130, 70, 0.2, torch.float32)),
    "streamed product pass reloads a panel before every warp is done with the previous one": (
        "    if (d0 > 0) __syncthreads();  // every warp is done with the previous panel\n",
        "",
        ("random+self", 75, 130, 70, 0.2, torch.bfloat16, 0, 40_000)),
    "dz stages a tile's columns after the barriers that publish them": (
        "      stage_columns(sm, k0, cols, pos, self, lse, g);\n"
        "      scale = grad_scale<T>(g, i0, rows, k0, cols), inv_scale = 1.f / scale;\n"
        "    }\n"
        "    logits_tile(sm, q, i0, N, !whole, k, k0, M, true, D);\n",
        "      scale = grad_scale<T>(g, i0, rows, k0, cols), inv_scale = 1.f / scale;\n"
        "    }\n"
        "    logits_tile(sm, q, i0, N, !whole, k, k0, M, true, D);\n"
        "    if constexpr (kSym) stage_columns(sm, k0, cols, pos, self, lse, g);\n",
        ("sym", "simclr", 74, 33, 0.07, torch.float32)),
    "a forward split also visits the next split's first key tile": (
        "k0 < t1 * kBK; k0 += kBK) {\n    const int cols = M - k0 < kBK ? static_cast<int>(M - k0) : kBK;\n"
        "    logits_tile(sm, q, i0, N, !whole, k, k0, M, true, D);\n    if (row.valid) {",
        "k0 <= t1 * kBK; k0 += kBK) {\n    const int cols = M - k0 < kBK ? static_cast<int>(M - k0) : kBK;\n"
        "    logits_tile(sm, q, i0, N, !whole, k, k0, M, true, D);\n    if (row.valid) {",
        ("moco", 37, 1000, 33, 0.2, torch.float32)),
}


def planted_library(text, planted, tmp_path):
    """The emulated kernels built from a copy of the sources with `text` in kernels/contrastive.cuh
    replaced by `planted`."""
    for part in ("emu", "kernels"):
        shutil.copytree(CSRC / part, tmp_path / "src" / part)
    path = tmp_path / "src" / "kernels" / "contrastive.cuh"
    source = path.read_text()
    assert source.count(text) == 1, "kernels/contrastive.cuh no longer contains the text this fault plants into"
    path.write_text(source.replace(text, planted))
    return contrastive_library(Emulated(tmp_path / "src", tmp_path))


@pytest.mark.parametrize("fault", FAULTS)
def test_planted_faults_are_caught(fault, tmp_path):
    """A copy of the kernels with one bug planted fails under at least one scheduling order."""
    text, planted, case = FAULTS[fault]
    faulty = planted_library(text, planted, tmp_path)
    caught = []
    for order in ORDERS:
        faulty.order(order)
        try:
            if case[0] == "sym":
                check_sym(faulty, *case[1:])
            else:
                check(faulty, *case[:6], seed=case[6] if len(case) > 6 else 0,
                      max_shared=case[7] if len(case) > 7 else H100_SHARED)
        except (EmulatorFault, AssertionError) as e:
            caught.append(f"{order}: {type(e).__name__}: {str(e)[:200]}")
    assert caught, f"the planted fault ({fault}) went unnoticed under both scheduling orders"
