"""Which decode batch sizes get a CUDA graph (the replay itself is tested on the GPU in test_engine.py)."""

from vibee.runtime.cuda_graphs import capture_sizes


def test_capture_sizes_cover_every_batch_up_to_the_limit():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 20
    # Every batch up to the limit has a captured size at least as large and less than 2x (or +16) bigger.
    for n in range(1, 257):
        b = min(s for s in sizes if s >= n)
        assert b - n < max(n, 16)
