"""`vibee bench tiles --quant none`: report the decoder GEMV's sweep (gemv_tile_sweep.py measures and
derives the `gemv_tiles` table), plot it and write it into the decoder spec."""

from __future__ import annotations

from pathlib import Path

from vibee.bench.report import Section, environment, fail


def gemv_tiles(gen, config, dev, dtype_name, weights, epilogues, result_dir, write_spec, out, err) -> None:
    """Time the decoder GEMV's candidates on one row of each weight (epilogues: the weights a step runs
    with silu * up's or RoPE's), report the derived gemv_tiles beside cuBLAS and the spec's own
    launch, and write them into the spec with --write-spec."""
    from vibee.bench import gemv_tile_sweep
    from vibee.bench.commands_tiles import _report, _result, _skipped, _timing, _with_progress, _writable, _write_spec
    from vibee.bench.kernels import operand_copies, time_call
    from vibee.runtime.engine import TORCH_DTYPES

    spec = gen.specs["decoder"]
    if write_spec:
        _writable(Path(spec.path), lambda text: gemv_tile_sweep.paste_gemv_table(text, list(spec.config.gemv_tiles)))
    measured = _with_progress(err, len(weights), lambda on_product: gemv_tile_sweep.sweep_gemv(
        gen.decoder, weights, device=dev, dtype=TORCH_DTYPES[dtype_name], time_call=time_call, epilogues=epilogues,
        on_product=on_product, operand_copies=operand_copies))
    try:
        table = gemv_tile_sweep.derive_gemv_table(measured)
    except ValueError as exc:
        fail(str(exc))
    lines = gemv_tile_sweep.gemv_spec_lines(table)

    def us(s, dense):
        return f"{1e6 * s:.1f} ({s / dense:.2f}x)"

    product_rows = []
    for r in measured:
        best = r.best()
        product_rows.append([f"{r.n}x{r.k}", epilogues.get((r.n, r.k), gemv_tile_sweep.Epilogue()).kind,
                             f"{1e6 * r.dense_s:.1f}", us(r.table_s, r.dense_s), us(r.times[best], r.dense_s),
                             r.tiles[best].summary()])
    env = environment(dev)
    title = f"vibee bench tiles on {env.get('device_name', dev)} (the decoder's one-token GEMV, {dtype_name})"
    notes = [_timing(dev) + "'spec': the launch the current decoder spec picks; 'cuBLAS': F.linear alone. 'runs as': "
             "the kernel a one-token step runs for the weight (the plain GEMV, gate_up's with silu * up, QKV's with RoPE "
             "and the K/V store: --shape knows which; --weights times the plain GEMV).",
             f"Paste the table into the decoder spec's config (gemv_tiles:), or rerun with --write-spec: {spec.path}",
             *_skipped(measured)]
    sections = [Section("Weights (one row)", ["weight", "runs as", "cuBLAS µs", "spec µs", "best µs", "best launch"],
                        product_rows),
                Section("Derived table (first match by max_n, min_k)", ["gemv_tiles:"], [[line.strip()] for line in lines]),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    data = {"benchmark": "tiles", "settings": {"device": dev, "dtype": dtype_name, "quant": "none", "rows": [1],
                                               "weights": weights, "spec_dir": str(config.spec_dir)},
            "results": [_result(r) for r in measured], "gemv_tiles": [t.model_dump() for t in table], "environment": env}
    _report(out, result_dir, data, title, sections, notes, measured, "  gemv_tiles:\n" + "\n".join(lines) + "\n",
            plot=plot_gemv)
    if write_spec:
        _write_spec(Path(spec.path), lambda text: gemv_tile_sweep.paste_gemv_table(text, table),
                    lambda loaded: list(loaded.config.gemv_tiles), list(table), out)


def plot_gemv(measured, path: Path, title: str) -> Path:
    """Each weight's GEMV time over cuBLAS's: the spec's launch and the fastest one, 1.0 marked."""
    from vibee.bench.plot import figure, save

    fig, ax = figure(figsize=(9, 5))
    names = [f"{r.n}x{r.k}" for r in measured]
    at = range(len(measured))
    ax.bar([i - 0.2 for i in at], [r.table_s / r.dense_s for r in measured], width=0.4, label="spec's launch")
    ax.bar([i + 0.2 for i in at], [r.times[r.best()] / r.dense_s for r in measured], width=0.4, label="fastest launch")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(list(at), names, rotation=30, ha="right")
    ax.set_ylabel("time over cuBLAS's F.linear (lower is faster)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path, title)
