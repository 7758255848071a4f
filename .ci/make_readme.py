"""Write README.md from nbs/index.ipynb without Quarto: markdown cells as they are, visible code cells fenced,
text outputs fenced. Hidden cells (`#| hide`) are left out. Run from the repository root."""
import sys
from pathlib import Path

import nbformat


def visible(cell) -> bool:
    "False for cells marked `#| hide`."
    return not any(line.replace(" ", "") == "#|hide" for line in cell.source.splitlines())


def text_output(cell) -> str:
    "The plain-text outputs of a code cell."
    parts = [o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "")
             for o in cell.get("outputs", [])]
    return "".join(parts).strip()


def readme(notebook: Path) -> str:
    "Markdown for the README from the index notebook."
    blocks = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if not visible(cell): continue
        if cell.cell_type == "markdown": blocks.append(cell.source)
        elif cell.cell_type == "code":
            blocks.append(f"```python\n{cell.source}\n```")
            if out := text_output(cell): blocks.append(f"```\n{out}\n```")
    return "<!-- generated from nbs/index.ipynb by .ci/make_readme.py: do not edit -->\n\n" + "\n\n".join(blocks) + "\n"


if __name__ == "__main__":
    Path("README.md").write_text(readme(Path("nbs/index.ipynb")))
    sys.exit(0)
