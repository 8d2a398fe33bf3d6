"""A Triton kernel compiled for an H100/H200 on a machine without a GPU (Triton's own compiler and
bundled ptxas), in a process of its own: TRITON_INTERPRET's interpreter takes code the compiler
refuses, so a kernel the CPU suite runs only in the interpreter is compiled here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module, kernel, signature, constexprs, options = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
signature.update({name: "constexpr" for name in constexprs})
compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options)
print(json.dumps(compiled.asm["ptx"]))
"""


def ptx_for_sm90(module: str, kernel: str, signature: dict[str, str], constexprs: dict, **options) -> str:
    """The PTX of `module.kernel` for sm_90 (signature: Triton's argument types, constexprs their values;
    options: num_warps and the like). Fails the test with the compiler's message where it refuses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps([module, kernel, signature, constexprs, options])],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
