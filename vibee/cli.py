"""The `vibee` command: gen, check, explain, serve and bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vibee.engine_flags import engine_config, engine_options, user_errors
from vibee.ir.spec import SUPPORTED_TARGETS
from vibee.frontend.errors import Diagnostic, SpecError

SPEC_ARG = click.argument("specs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
TARGET_OPT = click.option("--target", type=click.Choice(SUPPORTED_TARGETS), default=None,
                          help="Generate for this target, overriding each spec's `language:`.")


def _report(diagnostics: list[Diagnostic]) -> None:
    for d in diagnostics:
        click.echo(d.render(), err=True)


def _load(specs, target, contracts=True):
    from vibee.ir.load import load_specs

    try:
        loaded, warnings = load_specs(list(specs), target, contracts=contracts)
    except SpecError as exc:
        _report(exc.diagnostics)
        n = sum(d.severity == "error" for d in exc.diagnostics)
        click.echo(f"{n} error{'s' if n != 1 else ''}", err=True)
        sys.exit(2)
    _report(warnings)
    return loaded


@click.group()
@click.version_option(package_name="vibee")
def main() -> None:
    """vibee: inference optimizations as specs, compiled into tested torch/Triton modules."""


@main.command()
@SPEC_ARG
@TARGET_OPT
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="output", show_default=True,
              help="Directory for vibee_gen/, tests/ and MANIFEST.json.")
@click.option("--check", "check_only", is_flag=True, help="Write nothing; exit 1 if output is stale or hand-edited.")
def gen(specs, target, out_dir, check_only):
    """Generate modules, references and tests from SPECS."""
    from vibee.codegen.generate import check, plan, write

    loaded = _load(specs, target)
    out = Path(out_dir)
    try:
        files = plan(loaded, out)
    except SpecError as exc:
        _report(exc.diagnostics)
        sys.exit(2)
    if check_only:
        problems = check(files, out)
        for p in problems:
            click.echo(f"{out / p}" if not p.startswith(str(out)) else p, err=True)
        if problems:
            click.echo(f"{len(problems)} generated file(s) out of date; run `vibee gen {' '.join(specs)}`", err=True)
            sys.exit(1)
        click.echo(f"{out}: up to date ({len(files)} files from {len(loaded)} spec(s))")
        return
    written, unchanged = write(files, out)
    for rel in written:
        click.echo(f"wrote {out / rel}")
    click.echo(f"{len(written)} written, {len(unchanged)} unchanged in {out}/ from {len(loaded)} spec(s)")


@main.command("check")
@SPEC_ARG
@TARGET_OPT
@click.option("--syntax-only", is_flag=True, help="Only parse; skip types, config and contract checks.")
def check_cmd(specs, target, syntax_only):
    """Validate SPECS without writing anything (exit 0 if valid, 2 with errors)."""
    if syntax_only:
        from vibee.frontend.parser import parse_file

        errors: list[Diagnostic] = []
        for path in specs:
            try:
                parse_file(path)
            except SpecError as exc:
                errors.extend(exc.diagnostics)
        if errors:
            _report(errors)
            sys.exit(2)
        click.echo(f"{len(specs)} spec(s): syntax ok")
        return
    loaded = _load(specs, target)
    for spec in loaded:
        click.echo(f"{spec.path}: ok ({spec.kind}, target {spec.target})")


def _explain_shape(shape: str | None, model_dir: str | None):
    """The model shape explain computes figures for: a built-in shape, or a model directory's config.json."""
    from vibee.runtime.config import DEFAULT_MODEL_DIR
    from vibee.runtime.model_config import LoadError, ModelConfig

    if shape is not None and model_dir is not None:
        raise click.UsageError("give --shape or --model, not both")
    if shape is not None:
        from vibee.runtime.shapes import shape_config

        try:
            return shape_config(shape)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--shape") from None
    path = Path(model_dir or DEFAULT_MODEL_DIR) / "config.json"
    try:
        return ModelConfig.from_hf_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))
    except (OSError, ValueError, LoadError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--model") from None


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@TARGET_OPT
@click.option("--json", "as_json", is_flag=True, help="Print the resolved IR as JSON.")
@click.option("--shape", default=None, help="Compute the figures for a built-in model shape (llama-3.2-1b, llama-3.1-8b).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Compute the figures for the model in this Hugging Face directory (default: models/vibee-tiny).")
def explain(spec, target, as_json, shape, model_dir):
    """Print SPEC's resolved IR (every default filled in) and figures derived from it for a model."""
    (loaded,) = _load([spec], target, contracts=False)
    data = loaded.model_dump(mode="json")
    derived = loaded.config.derived(_explain_shape(shape, model_dir))
    if as_json:
        click.echo(json.dumps({"spec": data, "derived": derived}, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    console = Console()
    tree = Tree(f"[bold]{loaded.name}[/] {loaded.version}  kind={loaded.kind}  target={loaded.target}  module={loaded.module}")
    _add(tree.add("[bold]config[/] (defaults filled in)"), data["config"])
    if loaded.variants:
        vt = tree.add("[bold]variants[/]")
        for v in loaded.variants:
            node = vt.add(f"{v.name} {v.params or ''}")
            for role in ("score_mod", "mask_mod"):
                e = getattr(v, role)
                if e is not None:
                    node.add(f"{role}: {escape(e.source)}  [dim]-> torch: {escape(e.torch)}[/]")
    if loaded.types:
        tt = tree.add("[bold]types[/]")
        for t in loaded.types:
            tt.add(f"{t.name}(" + ", ".join(f"{f.name}: {f.type}" for f in t.fields) + ")")
    if loaded.behaviors:
        bt = tree.add("[bold]behaviors[/]")
        for b in loaded.behaviors:
            bt.add(f"{b.name}: {len(b.test_cases)} test case(s)" + ("" if b.known else " [yellow](documentation only)[/]"))
    tree.add(f"[bold]test_cases[/]: {len(loaded.all_test_cases())} generated, {len(loaded.ignored_test_cases)} descriptive only")
    if derived:
        _add(tree.add("[bold]derived[/]"), derived)
    console.print(tree)


def _add(node, value) -> None:
    """Spec values as tree leaves; escaped, since `[out, in]` would otherwise read as rich markup."""
    from rich.markup import escape

    if isinstance(value, dict):
        for k, v in value.items():
            if (isinstance(v, dict) and v) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)):
                _add(node.add(escape(str(k))), v)
            else:
                node.add(escape(f"{k}: {v}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _add(node.add(f"\\[{i}]"), v) if isinstance(v, (dict, list)) else node.add(escape(str(v)))
    else:
        node.add(escape(str(value)))



# --- serve ---------------------------------------------------------------------------------------

@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--served-model-name", default=None, help="Model name clients use (default: the directory's name).")
@click.option("--api-key", envvar="VIBEE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (also from VIBEE_API_KEY).")
@engine_options
def serve(host, port, api_key, **flags):
    """Serve a model over the OpenAI API, on the modules generated from the specs."""
    from vibee.runtime.serve import run_server

    config = engine_config(**flags)
    with user_errors():
        run_server(config, host=host, port=port, api_key=api_key)


def _register_bench() -> None:
    from vibee.bench.cli import bench

    main.add_command(bench)


_register_bench()


if __name__ == "__main__":
    main()
