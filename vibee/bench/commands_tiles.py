"""`vibee bench tiles`: retune the quantization spec's launch tiles for this GPU (tile_sweep.py
measures and derives the table; this reports it and writes it out as spec lines)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from vibee.bench.report import Section, environment, fail, finish
from vibee.engine_flags import engine_config, user_errors


def _counts(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        fail(f"{what} takes positive integers separated by commas, got {text!r}")
    return values


def _weights(text: str) -> list[tuple[int, int]]:
    """'NxK,...' -> [(n, k), ...]."""
    try:
        pairs = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        fail(f"--weights takes output x input sizes separated by commas (e.g. 3072x2048,16384x2048), got {text!r}")
    return pairs  # type: ignore[return-value]


def model_weights(shape: str) -> list[tuple[int, int]]:
    """The distinct [n, k] linear weights of a known shape's layers (merged qkv and gate/up, as served) and lm_head."""
    from vibee.runtime.shapes import shape_config

    c = shape_config(shape)
    d = c.head_dim
    weights = [((c.num_heads + 2 * c.num_kv_heads) * d, c.hidden_size), (c.hidden_size, c.num_heads * d),
               (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size), (c.vocab_size, c.hidden_size)]
    return list(dict.fromkeys(weights))


def shapes_weights(shapes: tuple[str, ...]) -> list[tuple[int, int]]:
    """The distinct weights of several shapes, in order: a table derived from one shape's widths sends
    other widths to launches tuned for its nearest (the 1B's table sent 14336-row weights to dense)."""
    return list(dict.fromkeys(w for shape in shapes for w in model_weights(shape)))


# A row count's table row covers the counts above the one before, the last any M (4096: a long prefill's
# chunk, where dequantize-then-cuBLAS wins; with 512 last, 8192-token chunks took a 256-row tile)
ROWS = (1, 16, 32, 64, 128, 256, 512, 4096)


@click.command()
@click.option("--shape", type=click.Choice(["llama-3.2-1b", "llama-3.1-8b"]), multiple=True,
              default=("llama-3.2-1b", "llama-3.1-8b"), show_default=True,
              help="Time the linear weights of this model shape (qkv, o, gate_up, down, lm_head); repeat it for several: "
                   "the table covers the weight widths of all of them.")
@click.option("--weights", default=None, help="Instead of --shape: [out x in] weights, e.g. 3072x2048,16384x2048.")
@click.option("--rows", default=",".join(map(str, ROWS)), show_default=True,
              help="Activation row counts timed; each one's table row covers the counts above the previous one, the last any "
                   "(or, where the spec's table has rows for more rows, up to it: those rows are kept).")
@click.option("--quant", type=click.Choice(["int4", "int8", "fp8", "none"]), default="int4", show_default=True,
              help="The codes whose kernel is tuned: int4/int8 write the quantization spec's `tiles:`, fp8 its "
                   "`fp8_tiles:` and `fp8_triton_max_rows:` (the W8A8 Triton kernel's launches, and the rows up to which "
                   "it runs where cuBLASLt's fp8 GEMM could); none: the decoder spec's `gemv_tiles:` (the one-token GEMV "
                   "of 16-bit weights; one row, --rows is not used).")
@click.option("--spec-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
@click.option("--write-spec", is_flag=True,
              help="Write the derived table into its spec (the rest of the file kept); then `vibee gen`.")
@click.option("--gpu-rows", is_flag=True,
              help="Make the derived rows this GPU's alone (`gpu: <its name>`, ahead of the rows for any device, which "
                   "stay): a table tuned on one GPU kept beside another's (the shipped rows are an H100's).")
def tiles(shape, weights, rows, quant, spec_dir, device, result_dir, write_spec, gpu_rows):
    """Time the quantized kernels' candidate launch tiles at each row count and weight on this GPU, and print the
    spec `tiles:` table that takes the fastest (paste it into the quantization spec, or --write-spec)."""
    from rich.console import Console

    import torch

    from vibee.bench import tile_sweep
    from vibee.bench.kernels import operand_copies, time_call
    from vibee.runtime.engine import TORCH_DTYPES
    from vibee.runtime.generated import load_generated

    out, err = Console(), Console(stderr=True)
    counts = sorted(set(_counts(rows, "--rows")))
    config = engine_config(device=device, dtype="auto", spec_dir=spec_dir, quant=quant)
    dev = config.resolve_device()
    if not dev.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        fail("bench tiles times the Triton kernels: run it on a GPU (TRITON_INTERPRET=1 runs it on the CPU, slowly, "
             "to check that it works)")
    if gpu_rows and quant in ("fp8", "none"):
        fail(f"--gpu-rows: the {'fp8 tile' if quant == 'fp8' else 'decoder GEMV'} table has no rows for one GPU alone; "
             "run without it")
    if gpu_rows and not dev.startswith("cuda"):
        fail("--gpu-rows tags the rows with this GPU's name: run it on a GPU")
    # the name without its vendor: "NVIDIA H100 80GB HBM3" -> "H100 80GB HBM3" (a row matches names holding it)
    gpu_name = torch.cuda.get_device_name(torch.device(dev)).removeprefix("NVIDIA ") if gpu_rows else None
    products = _weights(weights) if weights else shapes_weights(shape)
    dtype_name = "bfloat16" if dev.startswith("cuda") else "float32"  # the interpreter's bf16 tl.dot is wrong
    with user_errors():
        gen = load_generated(config.spec_dir, config.knob_settings(dtype_name))
    if quant == "none":
        if not hasattr(gen.decoder, "triton_gemv"):
            fail("the decoder spec has no GEMV to tune (its target is not triton)")
        from vibee.bench.commands_gemv_tiles import gemv_tiles
        from vibee.bench.gemv_tile_sweep import shapes_epilogues
        epilogues = {} if weights else shapes_epilogues(shape)
        return gemv_tiles(gen, config, dev, dtype_name, products, epilogues, result_dir, write_spec, out, err)
    quant_module = gen.quantization
    if quant == "fp8":
        if not hasattr(quant_module, "fp8_linear"):
            fail("the quantization spec has no fp8 kernel to tune (its target is not triton)")
        return _fp8_tiles(gen, config, dev, dtype_name, products, counts, result_dir, write_spec, out, err)
    if not hasattr(quant_module, "pick_launch"):
        fail("the quantization spec has no launch tiles to tune (its target is not triton)")
    # wgmma tiles where that kernel runs (elsewhere their launch is an mm tile the sweep times anyway)
    wgmma = (dev.startswith("cuda") and getattr(quant_module, "gluon", None) is not None
             and torch.cuda.get_device_capability(torch.device(dev)) == (9, 0))
    current = gen.specs["quantization"].config.tiles
    if write_spec:
        _writable(Path(gen.specs["quantization"].path), lambda text: tile_sweep.paste_table(text, current))
    measured = _with_progress(err, len(products) * len(counts), lambda on_product: tile_sweep.sweep(
        quant_module, products, counts, device=dev, dtype=TORCH_DTYPES[dtype_name], time_call=time_call,
        on_product=on_product, wgmma=wgmma, operand_copies=operand_copies))
    # Row counts outside the sweep's keep the spec's rows (--rows 1 retunes only the GEMV's, --rows 16,... all but it)
    if gpu_rows:
        table = tile_sweep.gpu_rows(tile_sweep.derive_table(measured), current, counts[0], counts[-1], gpu_name)
    else:
        table = tile_sweep.splice_table(tile_sweep.derive_table(measured), current, counts[-1], counts[0])
    lines = tile_sweep.spec_lines(table)

    def us(s):
        return f"{1e6 * s:.1f}"

    product_rows = []
    for r in measured:
        best = r.best()
        tile = r.tiles[best]
        product_rows.append([f"{r.n}x{r.k}", r.m, us(r.dense_s), f"{us(r.table_s)} ({r.table_s / r.dense_s:.2f}x)",
                             f"{us(r.times[best])} ({r.times[best] / r.dense_s:.2f}x)", tile.summary()])
    env = environment(dev)
    title = f"vibee bench tiles on {env.get('device_name', dev)} ({quant}, {dtype_name})"
    notes = [_timing(dev) + "'spec table': the launch the current spec picks."
             + ("" if wgmma else " No wgmma candidates: that kernel runs on sm_90 GPUs only."),
             f"Paste the table into the quantization spec's config (tiles:) to use it, or rerun with --write-spec: "
             f"{gen.specs['quantization'].path}", *_skipped(measured)]
    sections = [Section("Products", ["weight", "rows", "dense µs", "spec table µs", "best µs", "best tile"], product_rows),
                Section("Derived table (first match by max_m, min_n)", ["tiles:"], [[line.strip()] for line in lines]),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    data = {"benchmark": "tiles", "settings": {"device": dev, "dtype": dtype_name, "quant": quant, "rows": counts,
                                               "weights": products, "spec_dir": str(config.spec_dir)},
            "results": [_result(r) for r in measured], "table": [t.model_dump() for t in table], "environment": env}
    _report(out, result_dir, data, title, sections, notes, measured, "  tiles:\n" + "\n".join(lines) + "\n")
    if write_spec:
        _write_spec(Path(gen.specs["quantization"].path), lambda text: tile_sweep.paste_table(text, table),
                    lambda spec: list(spec.config.tiles), list(table), out)


def _report(out, result_dir, data, title, sections, notes, measured, snippet_text: str, plot=None) -> None:
    """The report (JSON, Markdown, the console), the derived spec lines beside it and the plot
    (plot(measured, path, title); default plot_tiles)."""
    json_path = finish(out, result_dir, "tiles", data, title, sections, notes)
    snippet = json_path.with_suffix(".tiles.vibee")
    snippet.write_text(snippet_text, encoding="utf-8")
    png = (plot or plot_tiles)(measured, json_path.with_suffix(".png"), title)
    out.print(f"wrote {snippet} and {png}", highlight=False)


def _timing(dev: str) -> str:
    return (f"Times are medians ({'CUDA graph replays after an L2 flush' if dev.startswith('cuda') else 'the Triton interpreter: not speeds'}); "
            "x: over the dense F.linear of the same weight. ")


def _skipped(measured) -> list[str]:
    """Notes on the candidates a sweep skipped: launches that failed, and launches whose product was wrong."""
    notes = []
    failed = sum(len(r.errors) for r in measured)
    if failed:
        notes.append(f"{failed} candidate launches failed on this device (their errors are in the JSON) and were skipped.")
    wrong = sorted({r.tiles[i].summary() for r in measured for i in r.wrong})
    if wrong:
        notes.append("These launches computed a wrong product here (over 1% off the dequantized weight's; a kernel or "
                     "compiler bug, in the JSON as 'wrong') and were skipped: " + "; ".join(wrong))
    return notes


def _result(r) -> dict:
    """One product's times as the JSON keeps them."""
    return {"n": r.n, "k": r.k, "m": r.m, "dense_s": r.dense_s, "table_s": r.table_s,
            "candidates": [{"tile": t.model_dump(), "seconds": s, "error": r.errors.get(i), "wrong": r.wrong.get(i)}
                           for i, (t, s) in enumerate(zip(r.tiles, r.times))]}


def _with_progress(err, total: int, run):
    """run(on_product) under a progress bar of `total` products (on_product(name) starts the next)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]timing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("", total=total)
        started = 0

        def on_product(name: str) -> None:  # called as each product starts: the ones before it are done
            nonlocal started
            bar.update(task, completed=started, description=name)
            started += 1

        measured = run(on_product)
        bar.update(task, completed=total)
    return measured


def _fp8_tiles(gen, config, dev, dtype_name, products, counts, result_dir, write_spec, out, err) -> None:
    """bench tiles --quant fp8: time the W8A8 kernel's candidates and cuBLASLt, report the derived
    fp8_tiles and fp8_triton_max_rows, and write them into the spec with --write-spec."""
    from vibee.bench import fp8_tile_sweep
    from vibee.bench.kernels import operand_copies, time_call
    from vibee.runtime.engine import TORCH_DTYPES

    spec = gen.specs["quantization"]
    if write_spec:
        _writable(Path(spec.path), lambda text: fp8_tile_sweep.paste_fp8(text, list(spec.config.fp8_tiles),
                                                                          spec.config.fp8_triton_max_rows))
    measured = _with_progress(err, len(products) * len(counts), lambda on_product: fp8_tile_sweep.sweep_fp8(
        gen.quantization, products, counts, device=dev, dtype=TORCH_DTYPES[dtype_name], time_call=time_call,
        on_product=on_product, operand_copies=operand_copies))
    try:
        table, max_rows = fp8_tile_sweep.derive_fp8(measured, spec.config.fp8_triton_max_rows)
    except ValueError as exc:
        fail(str(exc))
    lines = fp8_tile_sweep.fp8_spec_lines(table)

    def us(s, dense):
        return "-" if s is None else f"{1e6 * s:.1f} ({s / dense:.2f}x)"

    product_rows = []
    for r in measured:
        best = r.best()
        product_rows.append([f"{r.n}x{r.k}", r.m, f"{1e6 * r.dense_s:.1f}", us(r.table_s, r.dense_s),
                             us(r.times[best], r.dense_s), us(r.cublas_s, r.dense_s), r.tiles[best].summary()])
    env = environment(dev)
    title = f"vibee bench tiles on {env.get('device_name', dev)} (fp8, {dtype_name})"
    notes = [_timing(dev) + "'spec': the launch the current spec picks (cuBLASLt past fp8_triton_max_rows); "
             "'cuBLASLt': its fp8 GEMM with row-wise scales ('-': this torch or GPU has none, and fp8_triton_max_rows "
             "stays as it was).",
             f"Paste these lines into the quantization spec's config, or rerun with --write-spec: {spec.path}",
             *_skipped(measured)]
    derived = [*lines, f"  fp8_triton_max_rows: {max_rows}"]
    sections = [Section("Products", ["weight", "rows", "dense µs", "spec µs", "best Triton µs", "cuBLASLt µs", "best tile"],
                        product_rows),
                Section("Derived (fp8_tiles: first match by max_m)", ["fp8_tiles:"], [[line.strip()] for line in derived]),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    data = {"benchmark": "tiles", "settings": {"device": dev, "dtype": dtype_name, "quant": "fp8", "rows": counts,
                                               "weights": products, "spec_dir": str(config.spec_dir)},
            "results": [{**_result(r), "cublas_s": r.cublas_s} for r in measured],
            "fp8_tiles": [t.model_dump() for t in table], "fp8_triton_max_rows": max_rows, "environment": env}
    _report(out, result_dir, data, title, sections, notes, measured, "  fp8_tiles:\n" + "\n".join(derived) + "\n")
    if write_spec:
        _write_spec(Path(spec.path), lambda text: fp8_tile_sweep.paste_fp8(text, table, max_rows),
                    lambda spec: (list(spec.config.fp8_tiles), spec.config.fp8_triton_max_rows), (list(table), max_rows), out)


def _writable(path: Path, paste) -> None:
    """Fail before anything is timed where --write-spec could not put a table into the spec at path
    (paste(its text) raises: no block to replace), rather than after a sweep of minutes."""
    try:
        paste(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        fail(f"{path}: {exc}; nothing was timed (paste the table by hand after a run without --write-spec)")


def _write_spec(path: Path, paste, read_back, want, out) -> None:
    """paste(the spec's text) written to the spec at path, only if the spec then loads with
    read_back(spec) == want (else the file is left as it was and the command fails)."""
    from vibee.ir.load import load_specs

    old = path.read_text(encoding="utf-8")
    try:
        new = paste(old)
    except ValueError as exc:
        fail(f"{path}: {exc}; paste the table above by hand")
    path.write_text(new, encoding="utf-8")
    try:
        (spec,), _ = load_specs([path])
        if read_back(spec) != want:
            raise ValueError("the spec read back a different table")
    except Exception as exc:  # noqa: BLE001 (any failure puts the file back)
        path.write_text(old, encoding="utf-8")
        fail(f"{path}: the table did not load back ({exc}); the spec is unchanged")
    out.print(f"wrote the table into {path}; run `vibee gen {path}` to regenerate its modules", highlight=False)


def plot_tiles(measured, path: Path, title: str) -> Path:
    """Quantized time over the dense F.linear's per weight against the row count: the fastest
    candidate (solid; the derived table's launch unless widths merged) and the spec's current table
    (dashed), 1.0 marked."""
    from vibee.bench.plot import figure, save

    fig, ax = figure(figsize=(9, 5.5))
    weights = list(dict.fromkeys((r.n, r.k) for r in measured))
    colors = [f"C{i % 10}" for i in range(len(weights))]
    for (n, k), color in zip(weights, colors):
        runs = sorted((r for r in measured if (r.n, r.k) == (n, k)), key=lambda r: r.m)
        rows = [r.m for r in runs]
        ax.plot(rows, [r.times[r.best()] / r.dense_s for r in runs], "o-", color=color, label=f"{n}x{k}")
        ax.plot(rows, [r.table_s / r.dense_s for r in runs], "--", color=color, alpha=0.6)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xscale("log", base=2)
    counts = sorted({r.m for r in measured})
    ax.set_xticks(counts, [str(m) for m in counts])
    ax.set_xlabel("activation rows (M)")
    ax.set_ylabel("time over the dense F.linear (lower is faster)")
    ax.plot([], [], "k--", alpha=0.6, label="spec table before")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return save(fig, path, title)
