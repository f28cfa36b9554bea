"""Rewrite the README's recipe reference from the schema (the one place each key is described)."""

import re
from pathlib import Path

from qlora.config import recipe_reference

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"

text = README.read_text(encoding="utf-8")
block = f"{START}\n{recipe_reference()}\n{END}"
README.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S), encoding="utf-8")
print(f"updated {README}")
