// The CPU engine's vector code is compiled once per x86 instruction set, as ATen compiles its
// kernels, so that one build runs on any x86-64 CPU with the best code it can run. setup.py
// compiles every csrc/cpu/*.cpp but register_ops.cpp three times, with CPU_CAPABILITY naming
// the set: DEFAULT (no vector extension), AVX2 (AVX2, FMA, F16C) or AVX512 (F, BW, VL, DQ);
// register_ops.cpp registers the copy that at::get_cpu_capability() names (ATen's own choice for
// this CPU, which the ATEN_CPU_CAPABILITY variable overrides).
//
// Everything these files define lies in namespace rnnfast::cpu::CPU_CAPABILITY (inline), so the
// three copies are different functions. What they share from other headers (csrc/*.h, torch's,
// the standard library's inline functions and templates) the linker merges, keeping the first
// copy it meets: setup.py links the baseline objects first, then DEFAULT's, AVX2's and AVX512's,
// so a merged function is always a copy that any x86-64 CPU runs (tests/test_cpu_dispatch.py
// reads the binary to check it).
#pragma once

#if !defined(CPU_CAPABILITY_DEFAULT) && !defined(CPU_CAPABILITY_AVX2) && \
    !defined(CPU_CAPABILITY_AVX512)
#error \
    "csrc/cpu's kernels are compiled once per instruction set, with CPU_CAPABILITY set (setup.py)"
#endif
