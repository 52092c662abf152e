"""The CPU engine's buffer pool (csrc/cpu/buffer_pool.h): its large tensors are reused when
freed, stay ordinary tensors, never alias live ones, and are seen by the profiler."""
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
