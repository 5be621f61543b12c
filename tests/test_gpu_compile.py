"""The kernels compiled for the GPUs they are written for, without a GPU.

Every launcher in ``kernels/`` is called on CPU tensors with its ``@triton.jit`` kernels
swapped for recorders, so the exact arguments, constexprs and ``num_warps`` of each launch
are captured. Each launch is then specialised the way Triton specialises a real launch
(16-byte aligned pointers, integers divisible by 16 or equal to 1) and compiled for sm_80
and sm_90 with ``triton.compile``; the PTX goes through the ``ptxas`` shipped in Triton's
wheel (``-v``: registers, spills) and the cubin through ``cuobjdump -sass``.

Checks:
- every kernel the package launches compiles for fp32, bf16 and fp16 logits on both
  architectures with no register spills (spilled registers go to local memory: slow);
- for rows of 50,257 (odd: rows start at every 16-byte phase), every global load in the
  loops of the row kernels is 16 bytes wide (``LDG.E.128``), and every store in the
  gradient loops too (``STG.E.128``): the bulk of each row moves at full vector width.

The compiles run in a subprocess without ``TRITON_INTERPRET`` (the test session runs the
kernels under the interpreter); both architectures in parallel. Run this file as a script
for a table: ``python tests/test_gpu_compile.py [--sass DIR]``.

Two more tests compile single kernels from signatures written out by hand (the strided
kernels' fp64 and probability-target variants; the vocab-parallel kernels for sm_90, with
16-byte loads and stores in the PTX).

The two last tests are about ``bench/gpu_check.py``, the script to run on a lent GPU: without
CUDA it must fail in one clear line, and its ``--dry-run`` (every step on the CPU, under the
interpreter, tiny shapes) must pass.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # compiles in subprocesses, ptxas, and runs bench scripts

ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
V = 50_257  # the GPT-2 vocabulary: 100,514 bytes per bf16 row, rows at every alignment
WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # suffix -> bytes; none: 4
# launches of the row kernels over rows of V logits, whose loops must be all 16-byte wide
ROW_KERNELS = ("_ce_fwd_kernel", "_ce_bwd_kernel", "_ce_scale_kernel",
               "_split_partials_kernel", "_split_grad_kernel")


# ----------------------------------------------------------------------------------------
# The worker: runs in a subprocess, without TRITON_INTERPRET.


def _nvidia_bin(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def _ptxas():
    # the plain ptxas in Triton 3.9's wheel is older than the PTX version it emits
    return _nvidia_bin("ptxas-blackwell") or _nvidia_bin("ptxas")


def _launch_cases(dtype_name):
    """``(case, thunk)`` pairs calling every launcher of the package on CPU tensors."""
    import torch

    from fusedce.kernels import cross_entropy as ce
    from fusedce.kernels import split_rows as sr
    from fusedce.kernels import strided as st
    from fusedce.kernels import vocab_parallel as vp

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    n = 4
    x = torch.randn(n, V, generator=gen).to(dtype)
    t = torch.randint(0, V, (n,), generator=gen)
    w = torch.rand(V, generator=gen)
    lse = torch.zeros(n)
    dloss = torch.ones(1).expand(n)
    one = torch.ones(1)
    # (N, C, L) logits for the strided kernels: classes L apart, and probability targets
    x3 = torch.randn(2, 1000, 3, generator=gen).to(dtype)
    t3 = torch.randint(0, 1000, (2, 3), generator=gen)
    p3 = torch.softmax(torch.randn(2, 1000, 3, generator=gen), dim=1).to(dtype)
    lse3 = torch.zeros(6)
    dloss3 = torch.ones(1, 1).expand(2, 3)
    # the vocab-parallel kernels on a shard of V classes: per-row partials [lse | xt | swx],
    # (float64), then the shard's gradient from the merged per-row values (the lse float64)
    # and [W, C]
    part = torch.zeros(3 * n, dtype=torch.float64)
    vp_lse = torch.zeros(n, dtype=torch.float64)
    g = torch.ones(n)
    consts = torch.tensor([float(V), float(V)])
    dx = torch.empty_like(x)
    from fusedce._args import Extras

    extras = Extras(logit_scale=2.0, softcap=30.0, lse_square_scale=1e-4, aux=True)
    aux = torch.zeros(2, n)
    aux3 = torch.zeros(2, 6)
    part6 = torch.zeros(6 * n, dtype=torch.float64)

    # float64 (computed in float64, the strided kernels only) with class weights and label
    # smoothing, in the tiles the launcher picks: once, with the fp32 cases
    fp64 = []
    if dtype_name == "float32":
        x64 = torch.randn(2, 5000, 3, generator=gen, dtype=torch.float64)
        p64 = torch.softmax(torch.randn(2, 5000, 3, generator=gen, dtype=torch.float64), 1)
        xc64, tc = x64[:, :, :1].contiguous(), torch.zeros(2, 1, dtype=torch.long)
        w64, lse64 = torch.rand(5000, generator=gen, dtype=torch.float64), torch.zeros(6)
        d64 = torch.ones(1, 1, dtype=torch.float64)
        fp64 = [
            ("ce_strided_fwd-fp64-soft-weight-smoothing",
             lambda: st.ce_strided_fwd(x64, p64, w64, label_smoothing=0.1)),
            ("ce_strided_bwd-fp64-soft-weight-smoothing", lambda: st.ce_strided_bwd(
                x64, p64, lse64.double(), lse64.double(), d64.expand(2, 3), w64,
                label_smoothing=0.1, need_dtarget=True)),
            ("ce_strided_fwd-fp64-contiguous-weight-smoothing",
             lambda: st.ce_strided_fwd(xc64, tc, w64, label_smoothing=0.1)),
        ]
    else:
        # 16-bit logits with float64 class weights: computed in float64, the gradient
        # narrowed into the logits' dtype through fp32 (strided._narrowed)
        w3_64 = torch.rand(1000, generator=gen, dtype=torch.float64)
        fp64 = [("ce_strided_bwd-fp64-weight", lambda: st.ce_strided_bwd(
            x3, t3, lse3.double(), lse3, dloss3.double(), w3_64, label_smoothing=0.1))]

    def split(fn):  # few long rows: the split-row kernels, 4 programs per row
        def run():
            from fusedce.kernels import split_rows

            saved, split_rows.FORCE_SPLITS = split_rows.FORCE_SPLITS, 4
            try:
                return fn()
            finally:
                split_rows.FORCE_SPLITS = saved
        return run

    return [
        ("ce_fwd-split", split(lambda: sr.ce_fwd(x, t))),
        ("ce_fwd-split-inplace-weight-smoothing",
         split(lambda: sr.ce_fwd(x, t, w, label_smoothing=0.1, grad_scale=one))),
        ("ce_bwd-split", split(lambda: sr.ce_bwd(x, t, lse, dloss))),
        ("ce_bwd-split-weight-smoothing",
         split(lambda: sr.ce_bwd(x, t, lse, dloss, w, label_smoothing=0.1))),
        ("ce_fwd", lambda: ce.ce_fwd(x, t)),
        ("ce_fwd-inplace", lambda: ce.ce_fwd(x, t, grad_scale=one)),
        ("ce_fwd-inplace-weight-smoothing",
         lambda: ce.ce_fwd(x, t, w, label_smoothing=0.1, grad_scale=one)),
        ("ce_fwd-small-vocab", lambda: ce.ce_fwd(x[:, :1000], t % 1000)),
        # one class: Triton passes an integer argument equal to 1 as a constexpr, on which
        # the kernels called .to() (the interpreter does not specialize, so ran them)
        ("ce_fwd-one-class", lambda: ce.ce_fwd(x[:, :1].contiguous(), t * 0)),
        ("ce_bwd-one-class-smoothing", lambda: ce.ce_bwd(
            x[:, :1].contiguous(), t * 0, lse, dloss, label_smoothing=0.1)),
        ("vp_partials-one-column", lambda: vp.vp_partials(x[:, :1].contiguous(), t, None,
                                                          0.0, part)),
        ("ce_fwd-grad-out", lambda: ce.ce_fwd(x, t, grad_scale=one, grad_out=x.clone())),
        ("ce_bwd", lambda: ce.ce_bwd(x, t, lse, dloss)),
        ("ce_bwd-weight-smoothing", lambda: ce.ce_bwd(x, t, lse, dloss, w, label_smoothing=0.1)),
        ("ce_scale_", lambda: ce.ce_scale_(x, dloss)),
        ("ce_strided_fwd", lambda: st.ce_strided_fwd(x3, t3)),
        ("ce_strided_fwd-soft", lambda: st.ce_strided_fwd(x3, p3, label_smoothing=0.1)),
        ("ce_strided_bwd", lambda: st.ce_strided_bwd(x3, t3, lse3, lse3, dloss3)),
        ("ce_strided_bwd-soft", lambda: st.ce_strided_bwd(
            x3, p3, lse3, lse3, dloss3, label_smoothing=0.1, need_dtarget=True)),
        ("ce_strided_fwd-extras", lambda: st.ce_strided_fwd(
            x3, t3, label_smoothing=0.1, extras=extras, aux_out=aux3)),
        ("ce_strided_fwd-soft-extras", lambda: st.ce_strided_fwd(
            x3, p3, label_smoothing=0.1, extras=extras, aux_out=aux3)),
        ("ce_strided_bwd-extras", lambda: st.ce_strided_bwd(
            x3, t3, lse3, lse3, dloss3, label_smoothing=0.1, extras=extras, z_grad=lse3)),
        ("ce_strided_bwd-soft-extras", lambda: st.ce_strided_bwd(
            x3, p3, lse3, lse3, dloss3, label_smoothing=0.1, need_dtarget=True,
            extras=extras, z_grad=lse3)),
        ("vp_partials", lambda: vp.vp_partials(x, t, None, 0.0, part)),
        ("vp_partials-weight-smoothing", lambda: vp.vp_partials(x, t, w, 0.1, part)),
        ("vp_grad", lambda: vp.vp_grad(x, t, vp_lse, g, g, consts, 0.0, None, dx)),
        ("vp_grad-weight-smoothing",
         lambda: vp.vp_grad(x, t, vp_lse, g, g, consts, 0.1, w, dx)),
        # the loss extras: transform, aux outputs, z-loss (in the forward's gradient too)
        ("ce_fwd-extras-inplace", lambda: ce.ce_fwd(
            x, t, label_smoothing=0.1, grad_scale=one, extras=extras, aux_out=aux,
            z_scale=one)),
        ("ce_fwd-extras-inplace-weight-smoothing", lambda: ce.ce_fwd(
            x, t, w, label_smoothing=0.1, grad_scale=one, extras=extras, aux_out=aux,
            z_scale=one)),
        ("ce_bwd-extras", lambda: ce.ce_bwd(x, t, lse, dloss, extras=extras, z_grad=g)),
        ("ce_bwd-extras-weight-smoothing", lambda: ce.ce_bwd(
            x, t, lse, dloss, w, label_smoothing=0.1, extras=extras, z_grad=g)),
        ("ce_fwd-split-extras-with-grad", split(lambda: sr.ce_fwd(
            x, t, label_smoothing=0.1, grad_scale=one, extras=extras, aux_out=aux,
            z_scale=one))),
        ("ce_bwd-split-extras", split(lambda: sr.ce_bwd(x, t, lse, dloss, extras=extras,
                                                        z_grad=g))),
        ("vp_partials-extras", lambda: vp.vp_partials(x, t, w, 0.1, part6, extras)),
        ("vp_grad-extras",
         lambda: vp.vp_grad(x, t, vp_lse, g, g, consts, 0.1, w, dx, extras, g)),
    ] + fp64


def _kernel_modules():
    import importlib
    import pkgutil

    import fusedce.kernels

    return [importlib.import_module(f"fusedce.kernels.{m.name}")
            for m in pkgutil.iter_modules(fusedce.kernels.__path__)]


def _entry_points(module):
    """The module's ``@triton.jit`` functions that no other one of them calls: the kernels
    a launcher launches (the others are device functions inlined into them)."""
    from triton.runtime.jit import JITFunction

    jitted = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
    called = {name for name in jitted for other, fn in jitted.items()
              if other != name and re.search(rf"\b{name}\s*\(", fn.src)}
    return {name: obj for name, obj in jitted.items() if name not in called}


def _record_launches(dtype_name):
    """Calls every case with each module's kernels replaced by recorders.

    Returns the launches ``[(case, kernel, args, kwargs)]`` and the names of the kernels
    that no case launched.
    """

    launches = []
    current = {"case": None}

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((current["case"], self.fn, args, kwargs))

            return launch

    saved = []
    for module in _kernel_modules():
        for name, obj in _entry_points(module).items():
            saved.append((module, name, obj))
            setattr(module, name, Recorder(obj))
    try:
        for case, thunk in _launch_cases(dtype_name):
            current["case"] = case
            thunk()
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)
    launched = {fn.__name__ for _, fn, _, _ in launches}
    never = sorted(f"{m.__name__}.{name}" for m, name, _ in saved if name not in launched)
    return launches, never


def _compile(fn, args, kwargs, arch):
    """``triton.compile`` of one launch, specialised as Triton's own launch path does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def parse_sass(sass):
    """Global loads and stores of a SASS listing as ``(address, opcode, in_loop)``.

    A loop is the address range of a backward branch (``BRA`` to a lower address; the
    final ``BRA`` to itself that pads a kernel is not one).
    """
    insts = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);",
                         sass):
        insts.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []
    for addr, op, operands in insts:
        if op.startswith("BRA"):
            hit = re.search(r"0x([0-9a-f]+)", operands)
            if hit and int(hit.group(1), 16) < addr:
                loops.append((int(hit.group(1), 16), addr))
    mem = []
    for addr, op, _ in insts:
        if op.startswith(("LDG", "STG")):
            in_loop = any(lo <= addr <= hi for lo, hi in loops)
            mem.append((addr, op, in_loop))
    return mem, len(loops)


def width(opcode):
    """Bytes per thread of a LDG/STG opcode (``LDG.E.128`` -> 16, ``LDG.E`` -> 4)."""
    for part in opcode.split(".")[1:]:
        if part in WIDTHS:
            return WIDTHS[part]
    return 4


def _inspect(compiled, workdir, stem, keep_sass):
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    ptx_path = os.path.join(workdir, stem + ".ptx")
    cubin_path = os.path.join(workdir, stem + ".cubin")
    with open(ptx_path, "w") as f:
        f.write(ptx)
    run = subprocess.run([_ptxas(), f"-arch={arch}", "-v", ptx_path, "-o", cubin_path],
                         capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed for {stem}:\n{log}")

    def num(pattern):
        hit = re.search(pattern, log)
        return int(hit.group(1)) if hit else None

    out = {
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
        "ptxas_log": log,
    }
    cuobjdump = _nvidia_bin("cuobjdump")
    if cuobjdump:
        sass = subprocess.run([cuobjdump, "-sass", cubin_path], capture_output=True,
                              text=True, check=True).stdout
        mem, n_loops = parse_sass(sass)
        out["loops"] = n_loops
        out["mem"] = [(op, in_loop) for _, op, in_loop in mem]
        if keep_sass:
            with open(os.path.join(keep_sass, stem + ".sass"), "w") as f:
                f.write(sass)
    return out


def _describe(error):
    """The innermost cause first (Triton wraps the real error in CompilationErrors that
    point at each call site), then the outermost message."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    root, outer = chain[-1], chain[0]
    text = f"{type(root).__name__}: {str(root)[:1500]}"
    if outer is not root:
        text += f"\n  raised at: {type(outer).__name__}: {str(outer)[:1500]}"
    return text


def worker(arch, keep_sass=None):
    """Compiles every recorded launch for ``arch``; a JSON list of results on stdout."""
    import tempfile

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"
    results, never = [], set()
    with tempfile.TemporaryDirectory() as workdir:
        for dtype_name in DTYPES:
            launches, missed = _record_launches(dtype_name)
            never.update(missed)
            for case, fn, args, kwargs in launches:
                res = {"arch": arch, "dtype": dtype_name, "case": case, "kernel": fn.__name__,
                       "num_warps": kwargs.get("num_warps"),
                       "block": {k: v for k, v in kwargs.items()
                                 if k.startswith("BLOCK") or k == "VEC"}}
                stem = f"{fn.__name__}-{case}-{dtype_name}-sm{arch}"
                start = time.process_time()
                try:
                    res.update(_inspect(_compile(fn, args, kwargs, arch), workdir, stem,
                                        keep_sass))
                except Exception as e:  # reported per launch by the test
                    res["error"] = _describe(e)
                res["cpu_s"] = round(time.process_time() - start, 2)  # ptxas not included
                results.append(res)
    print(json.dumps({"results": results, "never_launched": sorted(never)}))


def compile_all(keep_sass=None):
    """Runs the worker for every architecture in parallel subprocesses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"]
    procs = [subprocess.Popen(cmd + [str(arch)] + (["--sass", keep_sass] if keep_sass else []),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for arch in ARCHS]
    results, never = [], set()
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"compile worker failed:\n{err[-5000:]}")
        data = json.loads(out.strip().splitlines()[-1])
        results += data["results"]
        never.update(data["never_launched"])
    return results, sorted(never)


# ----------------------------------------------------------------------------------------
# The tests


def _tools_or_skip():
    pytest.importorskip("triton")
    if _ptxas() is None:
        pytest.skip("no ptxas in triton/backends/nvidia/bin (Triton wheel without CUDA tools)")


@pytest.fixture(scope="module")
def compiled():
    _tools_or_skip()
    results, never = compile_all()
    if results and all("ptxas failed" in r.get("error", "") for r in results):
        # a tool problem, not a kernel one (e.g. a wheel whose ptxas predates its PTX)
        pytest.skip("the ptxas in Triton's wheel assembles none of the kernels: "
                    + results[0]["error"].splitlines()[0][:200])
    return results, never


def _label(r):
    return f"{r['kernel']} [{r['case']}, {r['dtype']}, sm_{r['arch']}]"


def test_every_kernel_has_a_launch_case(compiled):
    _, never = compiled
    assert not never, f"kernels no case of _launch_cases launches (add one): {never}"


def test_every_launch_compiles_for_sm80_and_sm90(compiled):
    results, _ = compiled
    assert {(r["arch"], r["dtype"]) for r in results} == {(a, d) for a in ARCHS for d in DTYPES}
    errors = [f"{_label(r)}: {r['error']}" for r in results if "error" in r]
    assert not errors, "\n\n".join(errors)


def test_no_register_spills(compiled):
    results, _ = compiled
    ok = [r for r in results if "error" not in r]
    assert ok, "nothing compiled"
    assert all(r["registers"] is not None for r in ok), "ptxas -v printed no register count"
    spills = [f"{_label(r)}: {r['registers']} registers, {r['spill_stores']} B spill stores, "
              f"{r['spill_loads']} B spill loads" for r in ok
              if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "\n".join(spills)
    # 255 is the hardware limit; more than that can only spill
    assert max(r["registers"] for r in ok) <= 255


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ROW_KERNELS)
def test_row_loops_move_16_bytes_per_instruction(compiled, kernel, dtype):
    """Rows of 50,257: in the loops, every global load of the row kernels is LDG.E.128
    and every store STG.E.128; the narrow accesses (the < 16-byte head and tail of each
    row, the per-row scalars) are outside the loops, run once per row."""
    if _nvidia_bin("cuobjdump") is None:
        pytest.skip("no cuobjdump in triton/backends/nvidia/bin")
    results, _ = compiled
    # Not the weighted label-smoothing cases: their loops also read the (C,) class weights,
    # which cannot share the 16-byte phase of every row of logits (4-byte loads of a vector
    # that stays in L2 for all rows). Not the 1,000-class case either (other block size),
    # nor the one-class ones (rows of one element, no 16-byte group in them).
    rows = [r for r in results if r["kernel"] == kernel and r["dtype"] == dtype
            and "weight" not in r["case"] and "small-vocab" not in r["case"]
            and "one-c" not in r["case"] and "error" not in r]
    assert len(rows) >= len(ARCHS), f"no compiled launch of {kernel} for {dtype}"
    for r in rows:
        assert r["loops"] >= 1, f"{_label(r)}: no loop found in the SASS"
        loads = [op for op, in_loop in r["mem"] if in_loop and op.startswith("LDG")]
        stores = [op for op, in_loop in r["mem"] if in_loop and op.startswith("STG")]
        assert loads, f"{_label(r)}: no global load in the loop"
        assert all(width(op) == 16 for op in loads), f"{_label(r)}: loop loads {loads}"
        assert all(width(op) == 16 for op in stores), f"{_label(r)}: loop stores {stores}"
        if kernel not in ("_ce_fwd_kernel", "_split_partials_kernel") or "inplace" in r["case"]:
            assert stores, f"{_label(r)}: the gradient loop stores nothing"
        # outside the loops: a handful per row (edge block, target, lse, upstream gradient)
        outside = [op for op, in_loop in r["mem"] if not in_loop]
        assert len(outside) <= 12, f"{_label(r)}: {len(outside)} accesses outside the loops"


# ----------------------------------------------------------------------------------------
# Single kernels compiled with signatures written out by hand (the strided kernels with
# fp64 and probability targets, the vocab-parallel kernels with a shard's launch
# configuration): cubins, and 16-byte accesses where the rows allow them.


_COMPILE_FOR_CUDA = r'''
import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fusedce.kernels.strided as K

POINTERS = {"x_ptr": "*bf16", "weight_ptr": "*fp32", "dx_ptr": "*bf16", "dy_ptr": "*fp32"}
for kernel in (K._ce_strided_fwd_kernel, K._ce_strided_bwd_kernel):
    names = list(inspect.signature(kernel.fn).parameters)
    # (probabilities, fp64, the loss extras: transform with softcap, aux, z-loss)
    for soft, fp64, extras in ((True, False, False), (False, True, False),
                               (True, False, True), (False, False, True)):
        acc = "*fp64" if fp64 else "*fp32"
        flags = {"SOFT": soft, "HAS_WEIGHT": True, "HAS_SMOOTHING": True, "NEED_DX": True,
                 "NEED_DY": soft, "IS_FP64": fp64, "BLOCK_R": 16, "BLOCK_C": 256,
                 "TRANSFORM": extras, "HAS_CAP": extras, "AUX": extras, "HAS_Z": extras}
        signature = {}
        for name in names:
            if name in flags:
                signature[name] = "constexpr"
            elif name in ("scale", "softcap"):
                signature[name] = "fp32"
            elif name == "target_ptr":
                signature[name] = "*fp32" if soft else "*i64"
            elif name.endswith("_ptr"):
                signature[name] = ("*fp64" if fp64 and name in ("x_ptr", "dx_ptr")
                                   else POINTERS.get(name, acc))
            else:
                signature[name] = "i64"
        constexprs = {(names.index(k),): v for k, v in flags.items() if k in names}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm, sorted(compiled.asm)
print("compiled")
'''


def test_strided_kernels_compile_for_a_cuda_target():
    """The interpreter runs the kernels' Python, not Triton's compiler: compile them ahead
    of time for an sm_90 target (no GPU needed) so that a construct only the compiler
    rejects fails here. Runs in a subprocess with TRITON_INTERPRET unset."""
    pytest.importorskip("triton.backends.compiler", reason="needs Triton's compiler API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_CUDA], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        pytest.skip(f"Triton's AOT compiler API is not available: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout


# Compiles the two vocab-parallel kernels for sm_90 (their launchers' own launch configuration, the
# pointers 16-byte aligned as a real launch specialises them) in a process without
# TRITON_INTERPRET: the interpreter accepts code the GPU compiler rejects. Prints, per
# kernel, its vector (16-byte) global loads and stores in the PTX.
_COMPILE_SM90 = r"""
import json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fusedce.kernels.vocab_parallel as D

def compile_one(fn, dtype, has_weight, smoothing, extras=False):
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}[dtype]
    sig = {"x_ptr": ptr, "x_row_stride": "i32"}
    if fn is D._vp_partials_kernel:
        sig.update(t_ptr="*i64", weight_ptr="*fp32", part_ptr="*fp64", n_rows="i32",
                   n_cols="i32", scale="fp32", softcap="fp32")
        const = {"AUX": extras}
    else:
        sig.update(dx_ptr=ptr, dx_row_stride="i32", t_ptr="*i64", lse_ptr="*fp64",
                   g_ptr="*fp32", w_t_ptr="*fp32", consts_ptr="*fp32", weight_ptr="*fp32",
                   zgrad_ptr="*fp32", n_cols="i32", label_smoothing="fp32", scale="fp32",
                   softcap="fp32")
        const = {"SAME_LAYOUT": True, "HAS_Z": extras}
    const.update(TRANSFORM=extras, HAS_CAP=extras)
    block, num_warps, vec = D.launch_config(dtype, 12_565)
    const.update(HAS_WEIGHT=has_weight, HAS_SMOOTHING=smoothing, BLOCK_SIZE=block, VEC=vec)
    sig.update({k: "constexpr" for k in const})
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, v in sig.items() if v.startswith("*")}
    out = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps})
    ptx = out.asm["ptx"]
    return {"v4_loads": len(re.findall(r"ld\.global\.v4", ptx)),
            "v4_stores": len(re.findall(r"st\.global\.v4", ptx)), "cubin": bool(out.asm["cubin"])}

bf16, fp32 = torch.bfloat16, torch.float32
res = {
    "partials-bf16-weight-smoothing": compile_one(D._vp_partials_kernel, bf16, True, True),
    "grad-bf16-weight-smoothing": compile_one(D._vp_grad_kernel, bf16, True, True),
    "grad-fp32": compile_one(D._vp_grad_kernel, fp32, False, False),
    "partials-bf16-extras": compile_one(D._vp_partials_kernel, bf16, True, True, True),
    "grad-bf16-extras": compile_one(D._vp_grad_kernel, bf16, True, True, True),
}
print("RESULT " + json.dumps(res))
"""


def test_vocab_parallel_kernels_compile_for_sm90():
    """The vocab-parallel kernels compile for a Hopper GPU (to a cubin) with 16-byte loads
    and stores."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, text=True,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    for name, r in res.items():
        assert r["cubin"], name
        assert r["v4_loads"] > 0, name  # the logits' aligned body, 16 bytes a load
        if name.startswith("grad"):
            assert r["v4_stores"] > 0, name


# ----------------------------------------------------------------------------------------
# bench/gpu_check.py, the script a lent GPU runs: it must fail clearly without CUDA and its
# code paths must work (its --dry-run runs them all on the CPU under the interpreter).

GPU_CHECK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "bench", "gpu_check.py")


def test_gpu_check_without_cuda_fails_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run for real")
    run = subprocess.run([sys.executable, GPU_CHECK], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_gpu_check_dry_run(tmp_path):
    """Correctness cases, timing table and CSV of the script, on the CPU (interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, GPU_CHECK, "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "correctness: 0 failure(s)" in run.stdout
    assert re.search(r"odd-shape launches: \d+ kernel launches, 0 failure\(s\)", run.stdout)
    assert " FAIL " not in run.stdout
    (csv_path,) = tmp_path.glob("gpu_check_*.csv")
    import csv

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    impls = {(r["impl"], r["pass"], r["dtype"]) for r in rows}
    for dt in ("bf16", "fp32"):
        assert {("fusedce", "fwd", dt), ("fusedce", "fwd_bwd", dt),
                ("fusedce-inplace", "fwd_bwd", dt), ("eager", "fwd", dt)} <= impls
    assert all(float(r["ms"]) > 0 and float(r["bytes"]) > 0 for r in rows)


def _table(results):
    lines = [f"{'kernel':<24} {'case':<32} {'dtype':<9} {'sm':>3} {'warps':>5} {'regs':>4} "
             f"{'spill':>5}  loop loads / loop stores / other loads+stores"]
    for r in sorted(results, key=lambda r: (r["kernel"], r["case"], r["dtype"], r["arch"])):
        if "error" in r:
            lines.append(f"{r['kernel']:<24} {r['case']:<32} {r['dtype']:<9} {r['arch']:>3} "
                         f"ERROR {r['error'].splitlines()[0][:100]}")
            continue

        def counts(sel, r=r):
            c = {}
            for op, in_loop in r.get("mem", []):
                if sel(op, in_loop):
                    key = f"{op.split('.')[0]}x{width(op)}B"
                    c[key] = c.get(key, 0) + 1
            return " ".join(f"{k}:{v}" for k, v in sorted(c.items())) or "-"

        lines.append(
            f"{r['kernel']:<24} {r['case']:<32} {r['dtype']:<9} {r['arch']:>3} "
            f"{r['num_warps']:>5} {r['registers']:>4} {r['spill_stores'] or 0:>5}  "
            f"{counts(lambda op, i: i and op.startswith('LDG'))} / "
            f"{counts(lambda op, i: i and op.startswith('STG'))} / "
            f"{counts(lambda op, i: not i)}")
    return "\n".join(lines)


if __name__ == "__main__":
    argv = sys.argv[1:]
    keep = argv[argv.index("--sass") + 1] if "--sass" in argv else None
    if keep:
        os.makedirs(keep, exist_ok=True)
    if argv and argv[0] == "--worker":
        worker(int(argv[1]), keep)
    else:
        results, never = compile_all(keep)
        print(_table(results))
        if never:
            print("never launched:", never)
