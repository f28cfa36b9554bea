"""Rewrite docs/reference.md's recipe reference from the schema (the one place each key is described)."""

import re
from pathlib import Path

from qlora.config import recipe_reference

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"

text = REFERENCE.read_text(encoding="utf-8")
block = f"{START}\n{recipe_reference()}\n{END}"
REFERENCE.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S), encoding="utf-8")
print(f"updated {REFERENCE}")
