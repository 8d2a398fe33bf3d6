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


def test_split_count_per_captured_batch_fills_the_gpu_and_no_more():
    from vibee.runtime.cuda_graphs import splits_for_batch

    # H100 (132 SMs), Llama-3.2-1B's 8 KV heads, 16 splits for max_model_len.
    assert splits_for_batch(16, 1, 8, 132) == 16  # 8 programs alone would leave the GPU idle
    assert splits_for_batch(16, 8, 8, 132) == 5
    assert splits_for_batch(16, 32, 8, 132) == 2
    assert splits_for_batch(16, 64, 8, 132) == 1
    assert splits_for_batch(16, 256, 8, 132) == 1  # 2,048 programs already: no partials, no merge
    assert splits_for_batch(3, 1, 8, 132) == 3  # never more than max_model_len needs
    assert all(splits_for_batch(16, b, 8, 132) >= splits_for_batch(16, 2 * b, 8, 132) for b in range(1, 200))
