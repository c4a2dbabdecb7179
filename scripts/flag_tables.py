"""The README's flag tables, generated from the scripts' own absl flag definitions.

    python scripts/flag_tables.py            # print every table
    python scripts/flag_tables.py --update   # rewrite the tables between the markers in README.md

A table sits in README.md between ``<!-- flags:NAME -->`` and ``<!-- /flags -->``; tests/test_readme.py fails
when one differs from what this prints, so the documented flags and defaults cannot drift from the code.
Each script is inspected in its own interpreter (several define flags of the same name).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# name in README -> (module to import, function that defines its flags or None when import defines them)
SCRIPTS: dict[str, tuple[str, str | None]] = {
    "preprocess": ("nnunet_jax.cli.preprocess", "define_flags"),
    "preprocess.synthetic": ("nnunet_jax.datasets.synthetic", "define_flags"),
    "preprocess.download": ("nnunet_jax.datasets.download", "define_flags"),
    "train.py": ("nnunet_jax.cli.train", "define_flags"),
    "predict.py": ("nnunet_jax.cli.predict", "define_flags"),
    "evaluate.py": ("nnunet_jax.cli.evaluate", "define_flags"),
    "benchmark.py": ("nnunet_jax.cli.benchmark", "define_flags"),
    "visualize.py": ("nnunet_jax.cli.visualize", "define_flags"),
    "find_best_configuration.py": ("nnunet_jax.cli.best_configuration", "define_flags"),
}

_PROBE = """
import importlib, json, sys
sys.path.insert(0, {root!r})
from absl import flags
mod = importlib.import_module({module!r})
if {define!r}:
    getattr(mod, {define!r})()
rows = []
for f in flags.FLAGS.get_flags_for_module(mod):
    rows.append([f.name, f.default_as_str if f.default is not None else "", f.help or ""])
print(json.dumps(rows))
"""


def flag_rows(name: str) -> list[list[str]]:
    module, define = SCRIPTS[name]
    code = _PROBE.format(root=str(ROOT), module=module, define=define)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"cannot list the flags of {name}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(name: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for flag, default, help_ in sorted(flag_rows(name)):
        shown = default.strip("'").replace(str(ROOT) + "/", "") if default else ""
        lines.append(f"| `--{flag}` | {cell(f'`{shown}`' if shown else '—')} | {cell(help_)} |")
    return "\n".join(lines)


MARKER = re.compile(r"(<!-- flags:(?P<name>[\w.]+) -->\n)(?P<body>(?:(?!<!-- ).)*?)(<!-- /flags -->)", re.S)


def render(readme: str) -> str:
    """README text with every marked table regenerated."""
    return MARKER.sub(lambda m: m.group(1) + table(m.group("name")) + "\n" + m.group(4), readme)


def main() -> None:
    if "--update" in sys.argv:
        README.write_text(render(README.read_text()))
        print(f"updated {README}")
        return
    for name in SCRIPTS:
        print(f"### {name}\n{table(name)}\n")


if __name__ == "__main__":
    main()
