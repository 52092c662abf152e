"""The CPU engine's copies per instruction set (csrc/cpu/capability.h): the extension runs the copy
ATen chose for this CPU, each copy this CPU can run gives torch.nn's results, and the binary keeps
AVX and AVX-512 instructions inside the copies that are chosen only where the CPU has them."""
import bisect
import collections
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rnnfast

X86_64 = platform.machine() in ("x86_64", "AMD64")

# The instruction sets this CPU runs, narrowest first, as ATen names them; and the extension's
# copies of the engine (setup.py builds all three on x86-64 unless RNNFAST_CPU_CAPABILITIES
# names fewer).
CPU_RUNS = ["DEFAULT", "AVX2", "AVX512"][:["DEFAULT", "AVX2", "AVX512"].index(
    torch.backends.cpu.get_cpu_capability()) + 1] if X86_64 else ["DEFAULT"]
BUILT = list(rnnfast._ops._C.cpu_engines)


def test_engine_runs_the_widest_copy_the_cpu_runs():
    assert BUILT[0] == "DEFAULT"
    if X86_64 and "RNNFAST_CPU_CAPABILITIES" not in os.environ:
        assert BUILT == ["DEFAULT", "AVX2", "AVX512"]
    assert rnnfast.cpu_capability() == [name for name in BUILT if name in CPU_RUNS][-1]


# Forward and backward of each cell against torch.nn, on sizes that reach each of the engine's
# product kernels: the register layer (hidden 2 and 8), the one-row product (batch 1), gate
# packing and the tiled product (batch 16, hidden 256), the GEMM per step (batch 64), packed
# sequences (the LSTM's gate panels over a batch of 17 rows that shrinks as rows end: row tiles
# of every kind), both directions, float64 and bfloat16; then the same results on 1 and 2
# threads.
COMPARE_WITH_TORCH_NN = r"""
import sys
import torch
import rnnfast
from torch.nn.utils.rnn import pack_padded_sequence

assert rnnfast.cpu_capability() == sys.argv[1], rnnfast.cpu_capability()
torch.manual_seed(0)
CASES = [  # (cell, batch, steps, input, hidden, layers, bidirectional, packed, dtype)
    ("LSTM", 3, 40, 2, 2, 1, False, False, torch.float32),
    ("RNN", 3, 40, 2, 8, 1, False, False, torch.float32),
    ("GRU", 4, 12, 5, 8, 2, True, True, torch.float32),
    ("LSTM", 1, 10, 12, 300, 1, False, False, torch.float32),
    ("GRU", 1, 10, 12, 300, 1, False, False, torch.float32),
    ("LSTM", 16, 6, 32, 256, 1, False, False, torch.float32),
    ("RNN", 16, 6, 32, 256, 1, True, False, torch.float32),
    ("GRU", 64, 5, 20, 96, 2, False, True, torch.float32),
    ("LSTM", 64, 5, 20, 64, 1, True, True, torch.float32),
    ("LSTM", 17, 8, 7, 150, 1, False, True, torch.float32),
    ("LSTM", 5, 7, 6, 40, 1, False, False, torch.float64),
    ("GRU", 8, 7, 6, 40, 1, False, False, torch.bfloat16),
]
for cell, B, T, I, H, L, bi, packed, dtype in CASES:
    ours = getattr(rnnfast, cell)(I, H, num_layers=L, bidirectional=bi).to(dtype)
    reference = getattr(torch.nn, cell)(I, H, num_layers=L, bidirectional=bi).to(dtype)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    results = []
    for layer in (ours, reference):
        xi = x.clone().requires_grad_()
        inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) if packed else xi
        out = layer(inp)[0]
        out = out.data if packed else out
        out.float().pow(2).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 0.1}[dtype]
    for got, want in zip(*results):
        scale = want.double().abs().max().clamp(min=1)
        err = ((got.double() - want.double()).abs().max() / scale).item()
        assert err < tol, (cell, B, T, I, H, L, bi, packed, dtype, err)

# The same results on 1 and 2 threads, bit for bit, as torch.nn's (one batch row's products
# included, whose sums MKL would split as it chooses); and on 3 threads for 25 rows, which they
# share as 9, 9 and 7 rows, each share in row tiles of its own.
for cell, B, H, dtype, thread_counts in [
        ("LSTM", 1, 300, torch.float32, (1, 2)), ("GRU", 1, 300, torch.float64, (1, 2)),
        ("RNN", 1, 640, torch.float32, (1, 2)), ("LSTM", 16, 256, torch.float32, (1, 2)),
        ("LSTM", 25, 200, torch.float32, (1, 2, 3)), ("GRU", 25, 200, torch.float32, (1, 2, 3))]:
    layer = getattr(rnnfast, cell)(24, H).to(dtype)
    x = torch.randn(12, B, 24, dtype=dtype)
    runs = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        xi = x.clone().requires_grad_()
        out = layer(xi)[0]
        grads = torch.autograd.grad(out.pow(2).sum(), [xi] + list(layer.parameters()))
        runs.append([out.detach()] + list(grads))
    for other in runs[1:]:
        for one, two in zip(runs[0], other):
            assert torch.equal(one, two), (cell, B, H, dtype, (one - two).abs().max().item())
print("ok", len(CASES))
"""


@pytest.mark.parametrize("capability", [name for name in BUILT if name in CPU_RUNS])
def test_each_instruction_set_gives_torch_nn_results(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    proc = subprocess.run([sys.executable, "-c", COMPARE_WITH_TORCH_NN, capability], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout


# Instructions by the set they need: AVX-512's registers (zmm, the mask registers, the upper
# sixteen xmm/ymm) and masking; any VEX-encoded instruction (AVX, AVX2, FMA, F16C).
AVX512_OPERAND = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{%k")
LEVELS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def instruction_level(instruction):
    if AVX512_OPERAND.search(instruction):
        return 2
    return 1 if instruction.startswith("v") else 0


def named_level(function):
    """The instruction set a function is compiled for by its (possibly mangled) name: its copy's
    namespace rnnfast::cpu::AVX512 / AVX2, or a template of at::vec's per-set types; None for
    everything else."""
    if "AVX512" in function:
        return 2
    if "AVX2" in function:
        return 1
    return None


@pytest.mark.skipif(not X86_64, reason="the AVX copies are built on x86-64 only")
def test_avx_instructions_run_only_where_the_cpu_was_checked():
    """Every function that uses AVX2 or AVX-512 instructions belongs to that instruction set's copy,
    or is reached only from such functions (the standard library's and ATen's code that only
    that copy instantiates, or the compiler's clones of a copy's callees). A function the linker
    merged across copies and kept in its AVX build would break this."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the extension's instructions"
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", rnnfast._ops._C.__file__],
                             capture_output=True, text=True, check=True).stdout
    # Functions by start address (local clones of one name exist once per object file).
    name, level = {}, collections.Counter()  # level: the widest instruction set one uses
    references = []  # (referring function, target address, target name)
    function = None
    for line in listing.splitlines():
        header = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if header:
            function = int(header.group(1), 16)
            name[function] = header.group(2)
            level[function] += 0
            continue
        if function is None or "\t" not in line:
            continue
        instruction = line.split("\t", 1)[1].strip()
        level[function] = max(level[function], instruction_level(instruction))
        target = re.search(r"\s([0-9a-f]+) <(.*)>$", instruction)
        if target:
            references.append((function, int(target.group(1), 16), target.group(2)))
    starts = sorted(name)
    by_name = collections.defaultdict(list)
    for start in starts:
        by_name[name[start]].append(start)
    referrers = collections.defaultdict(set)  # function -> functions that call or address it
    for source, address, target_name in references:
        if "@plt" in target_name:  # a global function called through the PLT
            targets = by_name.get(target_name.split("@plt")[0], [])
        else:
            targets = [starts[bisect.bisect_right(starts, address) - 1]] if address >= starts[0] else []
        for target in targets:
            if target != source:
                referrers[target].add(source)
    # The widest set each function may use: its name's, else the narrowest its referrers allow
    # (a fixed point from the widest down; unreferenced functions may be called from anywhere).
    allowed = {f: 2 if named_level(name[f]) is None else named_level(name[f]) for f in starts}
    # A clone the compiler made of a local function with its call sites changed (.isra, .constprop,
    # .part) is reached by those calls only: never called where the listing has none (a dead
    # copy the compiler kept), it may use anything.
    dead_clones = {f for f in starts if not referrers[f] and re.search(
        r"\[clone \.(isra|constprop|part)\.\d+\]$", name[f])}
    changed = True
    while changed:
        changed = False
        for f in starts:
            if named_level(name[f]) is not None or f in dead_clones:
                continue
            bound = min((allowed[g] for g in referrers[f]), default=0)
            if bound < allowed[f]:
                allowed[f], changed = bound, True
    escaped = sorted(name[f] for f in starts if level[f] > allowed[f])
    assert not escaped, f"{len(escaped)} functions use instructions their callers may lack: " + \
        "; ".join(escaped[:5])


@pytest.mark.skipif(not X86_64, reason="the AVX copies are built on x86-64 only")
def test_scalar_templates_of_the_cell_math_are_inlined_in_each_copy():
    """csrc/cells.h's functions of scalar types (the layer normalisation's formulas, zoneout)
    have one name in every instruction set's copy: an out-of-line copy would be the portable
    one, which the AVX copies would then call. They are always inlined (RNNFAST_HD_INLINED)."""
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to read the extension's symbols"
    symbols = subprocess.run([nm, "-C", "--defined-only", rnnfast._ops._C.__file__],
                             capture_output=True, text=True, check=True).stdout
    out_of_line = [line for line in symbols.splitlines()
                   if re.search(r"rnnfast::(layer_norm_rstd|layer_norm_normal_form|layer_norm_affine|"
                                r"layer_norm_input_grad|zoneout|zoneout_backward)<", line)]
    assert not out_of_line, out_of_line[:3]
