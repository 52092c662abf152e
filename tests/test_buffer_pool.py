"""The CPU engine's buffer pool (csrc/buffer_pool.h): its large tensors are reused when
freed, stay ordinary tensors, never alias live ones, and are seen by the profiler."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import rnnfast

# Sizes whose outputs, workspaces and gradients are past the pool's 64 KiB minimum.
B, T, I, H = 16, 20, 24, 96


def training_step(layer, x):
    layer.zero_grad(set_to_none=True)
    output, _ = layer(x)
    output.sum().backward()


def test_a_repeated_step_reuses_the_freed_buffers():
    torch.manual_seed(0)
    layer = rnnfast.LSTM(I, H, batch_first=True)
    x = torch.randn(B, T, I)
    rnnfast.empty_cache()
    assert rnnfast.cpu_cache_info() == (0, 0)
    training_step(layer, x)
    training_step(layer, x)  # frees the first step's gradients, takes the same sizes again
    after_two = rnnfast.cpu_cache_info()
    assert after_two[0] > 0 and after_two[1] > 0
    training_step(layer, x)
    # Same shapes: every buffer came from the pool and went back to it.
    assert rnnfast.cpu_cache_info() == after_two
    rnnfast.empty_cache()
    assert rnnfast.cpu_cache_info() == (0, 0)


def test_pooled_results_match_torch_and_do_not_alias_live_tensors():
    torch.manual_seed(1)
    ours = rnnfast.GRU(I, H, batch_first=True)
    theirs = torch.nn.GRU(I, H, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    kept = []
    for step in range(3):
        x = torch.randn(B, T, I)
        with torch.no_grad():
            output, _ = ours(x)
            expected, _ = theirs(x)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
        kept.append((output, expected))
        del output  # a freed buffer for the next step; the kept outputs must not see it
    for output, expected in kept:
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    pointers = {output.untyped_storage().data_ptr() for output, _ in kept}
    assert len(pointers) == len(kept)


def test_pooled_tensors_are_ordinary_tensors():
    layer = rnnfast.RNN(I, H)
    with torch.no_grad():
        output, _ = layer(torch.randn(T, B, I))
    values = output.clone()
    output.resize_(2 * T, B, H)  # grows its storage: through the pool's allocator
    assert torch.equal(output[:T], values)
    output[T:] = 1.0
    assert bool((output[T:] == 1.0).all())


def test_the_profiler_sees_pooled_allocations_and_frees():
    layer = rnnfast.LSTM(I, H)
    x = torch.randn(T, B, I)
    output_bytes = T * B * H * 4
    with torch.no_grad():
        layer(x)  # the pool now holds a block of the output's size
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            output, _ = layer(x)
            del output
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert output_bytes in sizes and -output_bytes in sizes, sorted(set(sizes))


def test_a_full_cache_makes_room_for_the_blocks_freed_last():
    # Two live outputs of an Elman layer of 16 units, 64 MB each (the pool's largest blocks),
    # about fill its 128 MiB once freed; then a layer half as long: its output's block must take
    # the place of an old one, whose size will not come back.
    layer = rnnfast.RNN(1, 16)
    long_input, short_input = torch.randn(1000, 1000, 1), torch.randn(500, 1000, 1)
    cap = 128 << 20
    rnnfast.empty_cache()
    with torch.no_grad():
        outputs = [layer(long_input)[0] for _ in range(2)]
        del outputs
        full = rnnfast.cpu_cache_info()
        assert full[1] >= 2 and full[0] > cap - (64 << 20)
        layer(short_input)
        after_short = rnnfast.cpu_cache_info()
        assert after_short != full and after_short[0] <= cap
        layer(short_input)  # the same sizes again: served from the cache, which stays as it was
        assert rnnfast.cpu_cache_info() == after_short
    rnnfast.empty_cache()


def _resident_bytes():
    """The process's resident memory, from /proc/self/statm (pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_empty_cache_returns_the_memory_to_the_system():
    """The pool's free blocks leave the process's resident memory, not only the pool. glibc
    serves blocks below its mmap threshold from its heap, and the threshold rises to the size
    of a freed mmapped block (here 30 MB): freed there, under a live block, they stayed
    resident until the heap is trimmed."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("no /proc/self/statm to read the resident memory from")
    raises_the_threshold = torch.empty(30 << 20, dtype=torch.uint8)
    del raises_the_threshold
    torch.manual_seed(2)
    layer = rnnfast.LSTM(64, 256, batch_first=True)
    x = torch.randn(32, 100, 64)
    rnnfast.empty_cache()
    for _ in range(3):  # a few steps: the buffers of each are freed into the pool
        training_step(layer, x)
    live_above = torch.ones(1 << 18)
    layer.zero_grad(set_to_none=True)
    cached, _ = rnnfast.cpu_cache_info()
    assert cached > 16 << 20
    before = _resident_bytes()
    rnnfast.empty_cache()
    released = before - _resident_bytes()
    assert released >= cached // 2, (released, cached)
    assert live_above.sum() == 1 << 18


def test_forks_beside_a_thread_running_layers_do_not_hang():
    """Processes forked while another thread takes buffers from the pool: each child takes
    buffers from the pool too, and exits. A child that inherited the pool's mutex locked would
    wait forever (the parent waits 20 s for each). The layer runs once before the thread starts,
    as in a program that has run its model: a fork while another thread makes the first call of
    an op (torch's or ours) can leave the child waiting on that op's half-made static handle
    (__cxa_guard_acquire), 1 in about 100 first forks here, whatever the op's locks do."""
    script = textwrap.dedent("""
        import os, sys, threading, time
        import torch
        import rnnfast
        torch.set_num_threads(1)
        layer = rnnfast.GRU(24, 96, batch_first=True)
        x = torch.randn(16, 20, 24)
        with torch.no_grad():
            layer(x)
        stop = False
        def churn():
            while not stop:
                with torch.no_grad():
                    layer(x)
                rnnfast.empty_cache()
        worker = threading.Thread(target=churn)
        worker.start()
        for _ in range(60):
            pid = os.fork()
            if pid == 0:
                with torch.no_grad():
                    layer(x)
                os._exit(0)
            deadline = time.time() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.time() > deadline:
                    os.kill(pid, 9)
                    stop = True
                    print("a forked child hung")
                    os._exit(1)
                time.sleep(0.001)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        stop = True
        worker.join()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]
